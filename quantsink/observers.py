"""Observers turn the values a quantizer will see into a range [lo, hi] per group.

Every observer takes tensors shaped (groups, n): one row per quantization group (one row for a
per-tensor activation, one per output channel for per-channel weights) and may be fed many
batches. `range()` gives (lo, hi), each of shape (groups,).

For data-parallel calibration (quantsink.distributed) an observer gives what it accumulated
(`accumulated()`) and absorbs every rank's, in rank order (`absorb`): it then holds what one
observer fed the batches of all ranks in that order would hold, bit for bit.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Any

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

    def accumulated(self) -> dict[str, Any]:
        """What `observe` has gathered so far, for `absorb` in another process."""
        return {"lo": self.lo, "hi": self.hi}

    def absorb(self, parts: list[dict[str, Any]]) -> None:
        """Hold what one observer fed, in order, the batches behind each of `parts` (from
        `accumulated`, this observer's own among them) would hold."""
        device = self.lo.device
        self.lo = reduce(torch.minimum, [part["lo"].to(device) for part in parts])
        self.hi = reduce(torch.maximum, [part["hi"].to(device) for part in parts])


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
        # per batch, summed in batch order only in `range`, so that batches observed by other
        # ranks sum in the same order as in one process
        self._los: list[torch.Tensor] = []
        self._his: list[torch.Tensor] = []

    def observe(self, rows: torch.Tensor) -> None:
        super().observe(rows)
        rows = rows.detach().float()
        rows = rows[:, :: max(1, math.ceil(rows.numel() / self.MAX_QUANTILE_INPUT))]
        q = self.percentile / 100.0
        lo = torch.quantile(rows, 1.0 - q, dim=1)
        hi = torch.quantile(rows, q, dim=1)
        self._los.append(lo)
        self._his.append(hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        return reduce(torch.add, self._los) / len(self._los), reduce(torch.add, self._his) / len(self._his)

    def accumulated(self) -> dict[str, Any]:
        return {**super().accumulated(), "los": self._los, "his": self._his}

    def absorb(self, parts: list[dict[str, Any]]) -> None:
        device = self.lo.device
        super().absorb(parts)
        self._los = [lo.to(device) for part in parts for lo in part["los"]]
        self._his = [hi.to(device) for part in parts for hi in part["his"]]


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

    def observe(self, rows: torch.Tensor) -> None:
        super().observe(rows)
        rows = rows.detach().float()
        if rows.shape[1] > self.RESERVOIR_PER_ROW:
            # a generator of its own per batch: a batch's subsample must not depend on the batches
            # before it, which another rank may have observed
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(rows.shape[1], generator=generator)[: self.RESERVOIR_PER_ROW]
            rows = rows[:, keep]
        self._samples.append(rows)

    def accumulated(self) -> dict[str, Any]:
        return {**super().accumulated(), "samples": self._samples}

    def absorb(self, parts: list[dict[str, Any]]) -> None:
        device = self.lo.device
        super().absorb(parts)
        self._samples = [samples.to(device) for part in parts for samples in part["samples"]]

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
