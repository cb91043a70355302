"""The arithmetic of the dynamic KV cache: asymmetric min-max quantization of groups (KIVI) with
dense-and-sparse outliers picked per vector (KVQuant), the rotation that pre-RoPE keys are taken
out of and put back into, as integer codes and ranges that packed storage keeps and reads back
bit for bit; and the rounding of static KV scales as a compressed-tensors loader applies them."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from quantsink.quantizers.functional import MIN_SCALE, fake_quantize, quantize, signed_grid_shift


class GroupQuantization(NamedTuple):
    """`values`: what packed storage reads back; `scale`, `offset`: one per group (last dim
    reduced, kept as size 1); `outliers`: where `values` holds the exact input."""

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    outliers: torch.Tensor


def largest_magnitude_indices(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask, indices) of the `count` largest-magnitude entries of every vector along the
    last dimension of `x` (KVQuant's per-vector outliers); the indices as topk orders them."""
    chosen = torch.zeros_like(x, dtype=torch.bool)
    if not count:
        return chosen, torch.zeros(*x.shape[:-1], 0, dtype=torch.long, device=x.device)
    indices = x.abs().topk(count, dim=-1).indices
    return chosen.scatter_(-1, indices, True), indices


def largest_magnitudes(x: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` largest-magnitude entries of every vector along the last
    dimension of `x` (KVQuant's per-vector outliers)."""
    return largest_magnitude_indices(x, count)[0]


def group_ranges(x: torch.Tensor, outliers: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of every group along the last dimension of `x` (kept as size 1), in float32,
    the entries `outliers` marks left out; a group made only of outliers has range 0. Both are
    entries of `x` (or 0), so x's own dtype holds them exactly: packed storage keeps them there."""
    work = x.float()
    if outliers is None:
        return work.amin(dim=-1, keepdim=True), work.amax(dim=-1, keepdim=True)
    dense = ~outliers.all(dim=-1, keepdim=True)
    low = work.masked_fill(outliers, math.inf).amin(dim=-1, keepdim=True).where(dense, 0.0)
    high = work.masked_fill(outliers, -math.inf).amax(dim=-1, keepdim=True).where(dense, 0.0)
    return low, high


def range_scale(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 step of the 2^bits levels from `low` to `high`; their zero point is 0. What
    `qparams_from_range(0, high - low, bits, symmetric=False)` computes (high >= low), in two
    operations: every read-back of packed storage recomputes it."""
    return ((high.float() - low.float()) / (2**bits - 1)).clamp_min(MIN_SCALE)


def codes_in_range(work: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (as floats) of float32 `work` on the 2^bits levels from `low` to `high`
    (broadcast against it); values beyond the range clip."""
    scale = range_scale(low, high, bits)
    return quantize(work - low.float(), scale, torch.zeros_like(scale), bits, symmetric=False)


def read_back(codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 codes * scale + low, computed in place in `codes`: what `codes_in_range` codes
    stand for. Two roundings in this order, never fused into one, so packed storage reads back
    what the arithmetic computed."""
    return codes.mul_(range_scale(low, high, bits)).add_(low.float())


def quantize_groups(x: torch.Tensor, bits: int, outliers: Optional[torch.Tensor] = None) -> GroupQuantization:
    """Asymmetric min-max quantization of every group along the last dimension of `x`, with the
    entries `outliers` marks (dense-and-sparse) kept exact and out of their group's range; a
    group made only of outliers has range 0."""
    work = x.float()
    outliers = torch.zeros_like(work, dtype=torch.bool) if outliers is None else outliers
    low, high = group_ranges(work, outliers)
    dequantized = read_back(codes_in_range(work, low, high, bits), low, high, bits)
    return GroupQuantization(torch.where(outliers, work, dequantized).to(x.dtype), range_scale(low, high, bits), low, outliers)


def quantize_in_range(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, outliers: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The read-back of `x` quantized onto the asymmetric grid of the given range ([low, high],
    broadcast against `x`; values beyond it clip), the entries `outliers` marks kept exact: the
    arithmetic of `quantize_groups` with a calibrated range."""
    work = x.float()
    dequantized = read_back(codes_in_range(work, low, high, bits), low, high, bits)
    return (dequantized if outliers is None else torch.where(outliers, work, dequantized)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation by 90 degrees of each (first half, second half) channel pair, as the
    Llama-style attentions of transformers apply it."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE on the first `cos.shape[-1]` channels of `x` (the rest pass), or its inverse."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    turned = rotate_half(rotated) * (-sin if inverse else sin)
    return torch.cat([rotated * cos + turned, passed], dim=-1)


def fake_quantize_signed_grid(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric fake quantization as compressed-tensors computes it when transformers
    loads a checkpoint (`forward_quantize`): round(clamp(x / scale, -2^(b-1), 2^(b-1) - 1)) *
    scale, in x's dtype with the scale cast to it, as a loaded model holds its scales. That grid
    is quantsink's asymmetric one moved down by `signed_grid_shift`, so that shift as the zero
    point gives the same values (clamping before or after rounding agrees on integer bounds)."""
    scale = scale.to(x)
    return fake_quantize(x, scale, torch.full_like(scale, signed_grid_shift(bits, symmetric=False)), bits, symmetric=False)


FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448: the scale maps the calibrated |x| max there


def fake_quantize_float8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static fp8 (e4m3) fake quantization as compressed-tensors computes it for `type: float`,
    8 bits, when transformers loads a checkpoint: x / scale clamped to +-448, cast to
    float8_e4m3fn (round to nearest even) and back to x's dtype, times scale, with the scale cast
    to x's dtype first, as a loaded model holds it."""
    scale = scale.to(x)
    return (x / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8).to(x.dtype) * scale
