"""What a model family offers beyond the Adapter contract, as runtime-checkable Protocols.

A method lists the capabilities it needs in `Method.requires`; the pipeline checks them once
(quantsink.methods.base.require_capabilities) before any work is spent. Each Protocol's
docstring opens with the phrase, in the plural, that the error names it by.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from quantsink.models.attention import KVPrefix
    from quantsink.models.deletion import TokenDeletion
    from quantsink.models.probe import Tally


@runtime_checkable
class EditableEncoder(Protocol):
    """vision encoders (image patches and their sink tokens) whose token sequence quantsink can edit.

    A key/value prefix per block, observers of each block's keys and values, deletion of tokens
    at a block's input, and runs that start at a block on cached hidden states
    (quantsink.models.editable implements them for every image family), and where the family
    puts a register prefix by default (`register_prefix_blocks`: "to_last" or "sensitive_only")."""

    register_prefix_blocks: str

    def set_kv_prefix(self, block_index: int, prefix: KVPrefix | None) -> None: ...

    def observing_kv(
        self, block_indices: Iterable[int], observer: Callable[[int, torch.Tensor, torch.Tensor], None]
    ) -> AbstractContextManager[None]: ...

    def delete_tokens_at(self, block_index: int, count: int, refill: str = "none") -> TokenDeletion: ...

    def hidden_before(
        self, block_index: int, inputs: dict[str, torch.Tensor], resume: tuple[int, torch.Tensor] | None = None
    ) -> torch.Tensor: ...

    def run_from(self, block_index: int, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def probe_inputs(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class PatchGrids(Protocol):
    """image encoders whose patch grid quantsink can see.

    `watch_patch_grids(record)` hooks the model so that each forward, before its first block,
    calls `record` with every image's (rows, columns) grid, its patches following the leading
    special tokens in row-major order (quantsink.models.editable; what refill and the inspect
    heatmaps place tokens by)."""

    def watch_patch_grids(self, record: Callable[[list[tuple[int, int]]], None]) -> list[RemovableHandle]: ...


@runtime_checkable
class KVCacheHost(Protocol):
    """causal language models (the hosts of a KV cache).

    How the model's call and each decoder block receive the cache, what each attention hands it
    (`transform_kv`), its key/value heads and its rotary embedding (quantsink.models.causal_lm)."""

    @property
    def call_cache_keyword(self) -> str: ...

    @property
    def num_key_value_heads(self) -> int: ...

    def cache_of_call(self, kwargs: dict[str, Any]) -> Any: ...

    def probe_kv_cache(self, cache: Any) -> None: ...

    def transform_kv(
        self, block_index: int, transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        tally: Tally | None = None,
    ) -> RemovableHandle: ...

    def rotary_embedding(self) -> nn.Module: ...


@runtime_checkable
class TransformersCheckpoint(Protocol):
    """transformers models (what a Hugging Face folder's config.json describes).

    What an export in a format transformers loads asks of the model (quantsink.models.hf)."""

    def save_transformers_config(self, folder: Path) -> None: ...

    def tied_output_projection(self) -> str | None: ...


@dataclass(frozen=True)
class SmoothingGroup:
    """Linears that read one input, and where a per-channel smoothing s of that input (its
    Linears' weight columns times s) puts the 1/s that keeps the model's function: exactly one
    of `fold_into` and `multiply_input_of` is set.

    `fold_into`: a module whose weight's output channels (a Linear's rows, a LayerNorm's
    entries) and bias make exactly that input and feed nothing else: 1/s folds into them, free
    at run time. `multiply_input_of`: a module (never a Linear a backend replaces) whose first
    positional input is exactly that input and reaches those Linears alone: the input is
    multiplied by 1/s there, an elementwise product in every forward. `overwrite_input`: that
    input tensor is read by nothing else, so the product may overwrite it (no new tensor, and
    no page faults for one, in each forward)."""

    linears: tuple[str, ...]
    fold_into: str | None = None
    multiply_input_of: str | None = None
    overwrite_input: bool = False

    def __post_init__(self) -> None:
        if (self.fold_into is None) == (self.multiply_input_of is None):
            raise ValueError(f"a smoothing group of {self.linears} needs exactly one of fold_into and multiply_input_of")
        if self.overwrite_input and self.multiply_input_of is None:
            raise ValueError(f"a smoothing group of {self.linears} overwrites an input only where it multiplies one")


@runtime_checkable
class Smoothable(Protocol):
    """models whose Linear inputs quantsink can smooth (SmoothQuant).

    The groups of Linears that share an input, in model order, each with where its 1/s goes
    (`SmoothingGroup`): what the family's layer layout allows, known to its adapter only."""

    def smoothing_groups(self) -> list[SmoothingGroup]: ...


def describe(capability: type) -> str:
    """The phrase that names `capability` in errors: the opening line of its docstring."""
    return (capability.__doc__ or capability.__name__).strip().splitlines()[0].rstrip(".")
