"""Activation statistics gathered by hooks during the calibration pass.

Per block: the per-token l_inf norm of the residual stream (the block's output) and the
per-channel absmax. They feed the report (where the outliers are) and the methods (which tokens
and layers carry massive activations)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import reduce
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from quantsink.errors import UserError
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.handles import HandleSet
from quantsink.recipe import ExecutionConfig
from quantsink.sequential import IN_MEMORY, forward_passes


@dataclass
class ActivationStats:
    block_names: list[str]
    # [block][sample] -> l_inf norm of each real token of that sample at the block's output (after
    # a token deletion: of the tokens it kept)
    token_linf: list[list[torch.Tensor]]
    # [block] -> absmax of each hidden channel over every real token
    channel_absmax: list[torch.Tensor]

    def block_summary(self, block: int, top: int = 5) -> dict[str, Any]:
        norms = self.token_linf[block]
        flat = torch.cat(norms)
        owners = torch.cat([torch.full((len(n),), i, device=flat.device) for i, n in enumerate(norms)])
        positions = torch.cat([torch.arange(len(n), device=flat.device) for n in norms])
        order = flat.argsort(descending=True)[:top]
        median = flat.median().item()
        channel_values, channels = self.channel_absmax[block].topk(min(top, self.channel_absmax[block].numel()))
        return {
            "block": self.block_names[block],
            "max_token_linf": flat.max().item(),
            "median_token_linf": median,
            "max_over_median": flat.max().item() / max(median, 1e-12),
            "top_tokens": [
                {"sample": int(owners[i]), "token": int(positions[i]), "linf": float(flat[i])} for i in order
            ],
            "top_channels": [{"channel": int(c), "absmax": float(v)} for v, c in zip(channel_values, channels)],
        }

    def summary(self, top: int = 5) -> list[dict[str, Any]]:
        return [self.block_summary(block, top) for block in range(len(self.block_names))]

    @classmethod
    def merged(cls, parts: Sequence["ActivationStats"]) -> "ActivationStats":
        """The statistics of the batches behind each of `parts` in turn, as one pass over all of
        them gives (the data-parallel merge: samples in order, channel maxima)."""
        blocks = range(len(parts[0].block_names))
        return cls(
            block_names=parts[0].block_names,
            token_linf=[[norms for part in parts for norms in part.token_linf[block]] for block in blocks],
            channel_absmax=[reduce(torch.maximum, [part.channel_absmax[block] for part in parts]) for block in blocks],
        )


def finite_block_output(output: Any, block_name: str) -> torch.Tensor:
    """A block's output hidden states in float32, refused when any is NaN or inf (a one-line
    error naming the block: every statistic after it would be meaningless)."""
    hidden = hidden_states_of(output).detach().float()
    if not torch.isfinite(hidden).all():
        raise UserError(
            f"non-finite activations (NaN or inf) at the output of {block_name}: "
            "check the model's weights and inputs, or run it in float32"
        )
    return hidden


class StatisticsCollector:
    """Hooks on the adapter's blocks; use `attached()` as a context so that no hook outlives
    the pass."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.block_names = adapter.block_names()
        self._token_linf: list[list[torch.Tensor]] = [[] for _ in self.block_names]
        self._channel_absmax: list[torch.Tensor | None] = [None for _ in self.block_names]
        self._mask: torch.Tensor | None = None

    def _on_block_output(self, block: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = finite_block_output(output, self.block_names[block])
            token_linf = hidden.abs().amax(dim=-1)  # (batch, tokens)
            if self._mask is None:
                mask = torch.ones_like(token_linf, dtype=torch.bool)
            else:  # a token deletion shortens the sequence from its block on
                mask = self.adapter.block_output_tokens(block, self._mask)
            self._token_linf[block].extend(row[keep] for row, keep in zip(token_linf, mask))
            channel_absmax = hidden[mask].abs().amax(dim=0)
            previous = self._channel_absmax[block]
            self._channel_absmax[block] = channel_absmax if previous is None else torch.maximum(previous, channel_absmax)

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["StatisticsCollector"]:
        with HandleSet(self.adapter.model, "activation-statistics") as handles:
            for index, block in enumerate(self.adapter.blocks()):
                handles.add(block.register_forward_hook(self._on_block_output(index)))
            yield self

    def begin(self, inputs: dict[str, torch.Tensor]) -> None:
        """`inputs` enter the model (or, in a sequential pass, a block): their real tokens."""
        self._mask = self.adapter.token_mask(inputs)
        if self._mask is not None:
            self._mask = self._mask.bool()

    def collect(self, batches: Sequence[dict[str, torch.Tensor]], execution: ExecutionConfig = IN_MEMORY,
                watched: Sequence[str] = (), progress: bool = False) -> list[torch.Tensor]:
        """Run `batches` through the model as `execution` says (inside `attached()`); their embeddings."""
        return forward_passes(self.adapter, batches, execution, self.begin, watched, progress=progress)

    def result(self) -> ActivationStats:
        return ActivationStats(
            block_names=self.block_names,
            token_linf=self._token_linf,
            channel_absmax=list(self._channel_absmax),
        )
