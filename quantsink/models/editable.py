"""The sequence edits of an image encoder, the same for every family that offers them.

Keys and values prepended to a block's self-attention (`set_kv_prefix`), a look at each block's
keys and values (`observing_kv`), deletion of the largest tokens at a block's input
(`delete_tokens_at`), and running the model from a block on cached hidden states (`hidden_before`,
`run_from`): together the `EditableEncoder` capability (quantsink.models.capabilities) that
RegCache needs. A family only makes its attention run through `attend`
(`_editable_attention`) and answers the `DeletionHost` questions where its defaults do not fit.
"""
from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantsink.errors import UserError
from quantsink.models.attention import KVPrefix, edits_of
from quantsink.models.base import Adapter, ModelSource, hidden_states_of
from quantsink.models.deletion import TokenDeletion


class _Reached(Exception):
    """Stops a forward pass once the wanted hidden states are known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _Skipped(nn.Module):
    """Stands in for a block that a resumed forward does not run."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden


class EditableEncoderAdapter(Adapter):
    """An Adapter whose sequence quantsink can edit: an `EditableEncoder` and a `DeletionHost`."""

    # Where RegCache's register prefix goes by default (regcache.options.PREFIX_BLOCKS): every
    # block from its start on, as the paper does for CLIP, OpenCLIP and SigLIP.
    register_prefix_blocks = "to_last"

    def __init__(self, model: nn.Module, source: ModelSource):
        super().__init__(model, source)
        self._deletions: list[TokenDeletion] = []  # in force, see delete_tokens_at

    def block_output_tokens(self, block_index: int, per_token: torch.Tensor) -> torch.Tensor:
        for deletion in sorted(self._deletions, key=lambda deletion: deletion.block_index):
            per_token = deletion.tokens_at_output(block_index, per_token)
        return per_token

    # --- sequence edits -------------------------------------------------------------------
    def set_kv_prefix(self, block_index: int, prefix: KVPrefix | None) -> None:
        """Put `prefix` in front of the keys and values of a block's self-attention, for every
        sequence (None takes it away)."""
        edits_of(self._editable_attention(block_index)).prefix = prefix

    @contextlib.contextmanager
    def observing_kv(
        self, block_indices: Iterable[int], observer: Callable[[int, torch.Tensor, torch.Tensor], None]
    ) -> Iterator[None]:
        """Within the context, `observer(block_index, keys, values)` sees the (batch, heads, tokens,
        head_dim) keys and values of each listed block's attention as it computes them (no prefix)."""
        added = []
        try:
            for index in block_indices:
                callback = _bound_observer(observer, index)
                edits_of(self._editable_attention(index)).observers.append(callback)
                added.append((index, callback))
            yield
        finally:
            for index, callback in added:
                edits_of(self._editable_attention(index)).observers.remove(callback)

    def delete_tokens_at(self, block_index: int, count: int, refill: str = "none") -> TokenDeletion:
        """Delete, per sequence, the `count` tokens of largest l_inf norm at the input of block
        `block_index` (see TokenDeletion); `.remove()` the returned handle to undo it."""
        deletion = TokenDeletion(self, block_index, count, refill)
        self._deletions.append(deletion)
        deletion.on_remove(lambda: self._deletions.remove(deletion))
        return deletion

    @torch.no_grad()
    def hidden_before(
        self, block_index: int, inputs: dict[str, torch.Tensor], resume: tuple[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The residual stream entering block `block_index` for `inputs`, before any edit of that
        block (`num_blocks`: the stream leaving the last block). With `resume=(start, hidden)` the
        blocks before `start` are not run: `hidden` (what this method gave for `start`) enters
        block `start` instead. Nothing after the wanted point runs. With a token deletion in force
        before `block_index` that refills (`refill: neighbours`), the stream has its full length:
        the block takes the kept tokens from it, and so does a resumed forward."""
        blocks = self.blocks()

        def stop(_module: nn.Module, args: tuple, output: Any = None) -> None:
            raise _Reached(args[0] if output is None else hidden_states_of(output))

        if block_index < len(blocks):
            handle = blocks[block_index].register_forward_pre_hook(stop, prepend=True)
        else:
            handle = blocks[-1].register_forward_hook(stop)
        try:
            with self._resumed(resume):
                self.embed(inputs)
        except _Reached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"block {block_index} of {self.family} did not run")

    @torch.no_grad()
    def run_from(self, block_index: int, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding of `inputs` with `hidden` (from `hidden_before(block_index, inputs)`)
        entering block `block_index`; the blocks before it are not run."""
        with self._resumed((block_index, hidden)):
            return self.embed(inputs)

    @contextlib.contextmanager
    def _resumed(self, resume: tuple[int, torch.Tensor] | None) -> Iterator[None]:
        if resume is None:
            yield
            return
        start, hidden = resume
        names = self.block_names()[:start]
        originals = [self.model.get_submodule(name) for name in names]
        for name in names:
            self.model.set_submodule(name, _Skipped())
        # first among the block's pre-hooks, so that its own edits (a deletion) still apply
        handle = self.blocks()[start].register_forward_pre_hook(lambda _m, args: (hidden, *args[1:]), prepend=True)
        try:
            yield
        finally:
            handle.remove()
            for name, original in zip(names, originals):
                self.model.set_submodule(name, original)

    # --- what a family tells the sequence edits -------------------------------------------
    @abstractmethod
    def _editable_attention(self, block_index: int) -> nn.Module:
        """The module of a block whose attention runs through `attend`, made to do so."""

    # DeletionHost: the defaults fit a family whose blocks take the hidden states alone
    def call_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return None

    def with_call(
        self, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        return (hidden, *args[1:]), kwargs

    def follow_deletion(self, deletion: TokenDeletion) -> list[RemovableHandle]:
        return []

    def watch_patch_grids(self, record: Callable[[list[tuple[int, int]]], None]) -> list[RemovableHandle]:
        """The patch grid is the spatial shape of the patch embedding's output, whatever the image size."""
        family = self.family

        def note(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if output.dim() != 4:
                raise UserError(
                    f"the patch embedding of {family} gave a {tuple(output.shape)} output, not (batch, channels, rows, "
                    "columns): refill: neighbours cannot find the patch grid; use refill: none"
                )
            record([tuple(output.shape[-2:])] * output.shape[0])

        return [self.patch_embedding().register_forward_hook(note)]

    @abstractmethod
    def patch_embedding(self) -> nn.Module:
        """The module that cuts images into patches: for a convolution, its (batch, channels, rows,
        columns) output is the patch grid."""


def _bound_observer(observer: Callable[[int, torch.Tensor, torch.Tensor], None], index: int):
    return lambda keys, values: observer(index, keys, values)
