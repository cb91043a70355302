"""Integer quantization arithmetic shared by every quantizer and the KV cache.

One convention everywhere: q = clamp(round(x / scale) + zero_point, qmin, qmax) and
x_hat = (q - zero_point) * scale. Symmetric ranges are signed with zero_point 0
([-2^(b-1)+1, 2^(b-1)-1], so +-absmax both fit); asymmetric ranges are unsigned [0, 2^b-1].
"""
from __future__ import annotations

import torch

# Scales never go below this: an all-zero channel must not divide by zero.
MIN_SCALE = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def signed_grid_shift(bits: int, symmetric: bool) -> int:
    """What moves these integers onto the signed grid [-2^(b-1), 2^(b-1) - 1] that
    compressed-tensors (and vLLM) store: symmetric ones lie inside it already."""
    return 0 if symmetric else 2 ** (bits - 1)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (elementwise, any shape) onto the integer grid."""
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point).to(x.dtype)


def fake_quantize_along(x: torch.Tensor, dim: int | tuple[int, ...] | None, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic fake quantization with one scale per slice that keeps `dim` reduced
    (dim=None: one scale for the whole tensor; dim=-1: one per row, e.g. per token)."""
    if dim is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale, zero_point = qparams_from_range(lo, hi, bits, symmetric)
    return fake_quantize(x, scale, zero_point, bits, symmetric)
