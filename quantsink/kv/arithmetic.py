"""The arithmetic of the dynamic KV cache: asymmetric min-max quantization of groups with
dense-and-sparse outliers (KIVI, KVQuant), the rotation that pre-RoPE keys are taken out of and
put back into, and the replacement of chosen tokens by their read-back; and the rounding of
static KV scales as a compressed-tensors loader applies them."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from quantsink.quantizers.functional import fake_quantize, qparams_from_range, signed_grid_shift


class GroupQuantization(NamedTuple):
    """`values`: what packed storage reads back; `scale`, `offset`: one per group (last dim
    reduced, kept as size 1); `outliers`: where `values` holds the exact input."""

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    outliers: torch.Tensor


def quantize_groups(x: torch.Tensor, bits: int, outliers_per_group: int = 0) -> GroupQuantization:
    """Asymmetric min-max quantization of every group along the last dimension of `x`, with the
    `outliers_per_group` largest-magnitude values of each group kept exact and out of its range."""
    work = x.float()
    outliers = torch.zeros_like(work, dtype=torch.bool)
    if outliers_per_group:
        outliers.scatter_(-1, work.abs().topk(outliers_per_group, dim=-1).indices, True)
    low = work.masked_fill(outliers, math.inf).amin(dim=-1, keepdim=True)
    high = work.masked_fill(outliers, -math.inf).amax(dim=-1, keepdim=True)
    scale, zero_point = qparams_from_range(torch.zeros_like(low), high - low, bits, symmetric=False)
    dequantized = fake_quantize(work - low, scale, zero_point, bits, symmetric=False) + low
    values = torch.where(outliers, work, dequantized).to(x.dtype)
    return GroupQuantization(values, scale, low, outliers)


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
