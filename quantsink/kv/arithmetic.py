"""The arithmetic of the dynamic KV cache: asymmetric min-max quantization of groups (KIVI) with
dense-and-sparse outliers picked per vector (KVQuant), the rotation that pre-RoPE keys are taken
out of and put back into, and the replacement of chosen tokens by their read-back; and the
rounding of static KV scales as a compressed-tensors loader applies them."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from quantsink.quantizers.functional import fake_quantize, qparams_from_range, signed_grid_shift


class GroupQuantization(NamedTuple):
    """`values`: what packed storage reads back; `scale`, `offset`: one per group (last dim
    reduced, kept as size 1); `outliers`: where `values` holds the exact input."""

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    outliers: torch.Tensor


def largest_magnitudes(x: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` largest-magnitude entries of every vector along the last
    dimension of `x` (KVQuant's per-vector outliers)."""
    chosen = torch.zeros_like(x, dtype=torch.bool)
    if count:
        chosen.scatter_(-1, x.abs().topk(count, dim=-1).indices, True)
    return chosen


def quantize_groups(x: torch.Tensor, bits: int, outliers: Optional[torch.Tensor] = None) -> GroupQuantization:
    """Asymmetric min-max quantization of every group along the last dimension of `x`, with the
    entries `outliers` marks (dense-and-sparse) kept exact and out of their group's range; a
    group made only of outliers has range 0."""
    work = x.float()
    outliers = torch.zeros_like(work, dtype=torch.bool) if outliers is None else outliers
    dense = ~outliers.all(dim=-1, keepdim=True)
    low = work.masked_fill(outliers, math.inf).amin(dim=-1, keepdim=True).where(dense, 0.0)
    high = work.masked_fill(outliers, -math.inf).amax(dim=-1, keepdim=True).where(dense, 0.0)
    scale, dequantized = _onto_range(work, low, high, bits)
    return GroupQuantization(torch.where(outliers, work, dequantized).to(x.dtype), scale, low, outliers)


def quantize_in_range(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, outliers: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The read-back of `x` quantized onto the asymmetric grid of the given range ([low, high],
    broadcast against `x`; values beyond it clip), the entries `outliers` marks kept exact: the
    arithmetic of `quantize_groups` with a calibrated range."""
    work = x.float()
    dequantized = _onto_range(work, low.float(), high.float(), bits)[1]
    return (dequantized if outliers is None else torch.where(outliers, work, dequantized)).to(x.dtype)


def _onto_range(work: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, read-back) of float `work` on the 2^bits levels from `low` to `high`."""
    scale, zero_point = qparams_from_range(torch.zeros_like(low), high - low, bits, symmetric=False)
    return scale, fake_quantize(work - low, scale, zero_point, bits, symmetric=False) + low


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


def requantize(states: torch.Tensor, select: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`states` (batch, heads, length, head_dim) with the tokens chosen by `select` (batch,
    length) replaced by `quantizer`'s read-back; `quantizer` gets them as (tokens, heads,
    head_dim) in row-major order, so each row's tokens are consecutive and in order."""
    if not bool(select.any()):
        return states
    stored = states.clone()
    by_token = stored.transpose(1, 2)
    by_token[select] = quantizer(by_token[select])
    return stored


def fake_quantize_signed_grid(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric fake quantization as compressed-tensors computes it when transformers
    loads a checkpoint (`forward_quantize`): round(clamp(x / scale, -2^(b-1), 2^(b-1) - 1)) *
    scale, in x's dtype with the scale cast to it, as a loaded model holds its scales. That grid
    is quantsink's asymmetric one moved down by `signed_grid_shift`, so that shift as the zero
    point gives the same values (clamping before or after rounding agrees on integer bounds)."""
    scale = scale.to(x)
    return fake_quantize(x, scale, torch.full_like(scale, signed_grid_shift(bits, symmetric=False)), bits, symmetric=False)
