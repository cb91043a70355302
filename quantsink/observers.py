"""Observers turn the values a quantizer will see into a range [lo, hi] per group.

Every observer takes tensors shaped (groups, n): one row per quantization group (one row for a
per-tensor activation, one per output channel for per-channel weights) and may be fed many
batches. `range()` gives (lo, hi), each of shape (groups,).
"""
from __future__ import annotations

import math

import torch

from quantsink.errors import UserError
from quantsink.quantizers.functional import fake_quantize, qparams_from_range
from quantsink.registry import OBSERVERS


class Observer:
    def __init__(self, bits: int, symmetric: bool):
        self.bits = bits
        self.symmetric = symmetric
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        if not torch.isfinite(rows).all():
            raise UserError(
                "non-finite activations (NaN or inf) reached a quantizer during calibration: "
                "check the model's weights and inputs, or run it in float32"
            )
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data: the calibration pass never reached this module")
        return self.lo, self.hi


OBSERVERS.register("minmax")(Observer)


@OBSERVERS.register("percentile")
class PercentileObserver(Observer):
    """Clips each range to the given percentile of the values, averaged over batches: robust
    to a few extreme values, at the price of clipping them."""

    # torch.quantile refuses inputs over 2**24 elements; a strided subsample keeps the estimate.
    MAX_QUANTILE_INPUT = 2**24

    def __init__(self, bits: int, symmetric: bool, percentile: float = 99.99):
        super().__init__(bits, symmetric)
        self.percentile = percentile
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batches = 0

    def observe(self, rows: torch.Tensor) -> None:
        super().observe(rows)
        rows = rows.detach().float()
        rows = rows[:, :: max(1, math.ceil(rows.numel() / self.MAX_QUANTILE_INPUT))]
        q = self.percentile / 100.0
        lo = torch.quantile(rows, 1.0 - q, dim=1)
        hi = torch.quantile(rows, q, dim=1)
        self._sums = (lo, hi) if self._sums is None else (self._sums[0] + lo, self._sums[1] + hi)
        self._batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        return self._sums[0] / self._batches, self._sums[1] / self._batches


@OBSERVERS.register("mse")
class MSEObserver(Observer):
    """Shrinks the min-max range by the factor (from a grid) that minimises the mean squared
    quantization error of the observed values, per group."""

    # log-spaced so that heavy tails (a few values 100x the rest) can still be clipped hard
    SHRINK_GRID = torch.logspace(0, -2, 60)
    RESERVOIR_PER_ROW = 4096

    def __init__(self, bits: int, symmetric: bool):
        super().__init__(bits, symmetric)
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def observe(self, rows: torch.Tensor) -> None:
        super().observe(rows)
        rows = rows.detach().float()
        if rows.shape[1] > self.RESERVOIR_PER_ROW:
            keep = torch.randperm(rows.shape[1], generator=self._generator)[: self.RESERVOIR_PER_ROW]
            rows = rows[:, keep]
        self._samples.append(rows)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        values = torch.cat(self._samples, dim=1)
        best_error = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for shrink in self.SHRINK_GRID:
            scale, zero_point = qparams_from_range(lo * shrink, hi * shrink, self.bits, self.symmetric)
            error = (fake_quantize(values, scale[:, None], zero_point[:, None], self.bits, self.symmetric) - values)
            error = error.pow(2).mean(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo = torch.where(better, lo * shrink, best_lo)
            best_hi = torch.where(better, hi * shrink, best_hi)
        return best_lo, best_hi
