"""Token deletion: per sequence, the tokens of largest l_inf norm leave at a block's input.

`TokenDeletion` hooks the blocks; what it needs of a family (where a block's call carries its
attention mask, how to rebuild that call, the patch grid, any per-token state beyond the blocks)
is the small public `DeletionHost` protocol, which `EditableEncoderAdapter` implements.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantsink.errors import UserError
from quantsink.models.base import hidden_states_of
from quantsink.models.probe import NotRunError, Tally


class DeletionHost(Protocol):
    """What a token deletion needs of the adapter of the model it edits."""

    family: str
    num_prefix_tokens: int
    num_blocks: int

    def blocks(self) -> list[nn.Module]: ...

    def call_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The (batch, heads, queries, keys) attention mask a block is called with, if any."""

    def with_call(
        self, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        """A block's call arguments with other hidden states and mask."""

    def follow_deletion(self, deletion: "TokenDeletion") -> list[RemovableHandle]:
        """Hooks that keep per-token state beyond the blocks (a pooling head's mask) in step with
        `deletion`."""

    def watch_patch_grids(self, record: Callable[[list[tuple[int, int]]], None]) -> list[RemovableHandle]:
        """Hooks that, in every forward and before the first block runs, call `record` with the
        (rows, columns) patch grid of each image of the batch, its patches following the leading
        special tokens in row-major order (padding, if any, after them)."""


def take_tokens(x: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` with only the `kept` (batch, n) positions along `dim`, in their order; a batch
    dimension of 1 is broadcast."""
    dim = dim % x.dim()
    x = x.expand(kept.shape[0], *x.shape[1:])
    shape = [kept.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = kept.shape[1]
    sizes = [kept.shape[1] if axis == dim else size for axis, size in enumerate(x.shape)]
    return x.gather(dim, kept.view(shape).expand(sizes))


def take_mask(mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A (batch, heads, queries, keys) attention mask re-indexed to the kept tokens."""
    if mask.shape[-2] != 1:
        mask = take_tokens(mask, kept, -2)
    return take_tokens(mask, kept, -1)


def key_padding(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, keys): keys that a (batch, heads, queries, keys) mask hides from every query."""
    mask = mask.expand(batch, *mask.shape[1:])
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    return hidden.flatten(1, -2).all(dim=1)


class TokenDeletion:
    """Per sequence, the `count` tokens of largest l_inf norm are deleted at the input of block
    `block_index` (never the leading special tokens, never padding): from that block on the
    blocks compute on the shorter sequence, and the masks that travel beside it are re-indexed
    to match. `remove()` undoes it. Resuming a forward after the deletion block reuses the
    positions of the previous forward.

    What a block's output holds from `block_index` on, and so every hidden state the model
    returns (`output_hidden_states`, intermediate features, the last hidden state):
    - `refill="none"`: the kept tokens only, in their order (`kept`), `count` fewer than the input.
    - `refill="neighbours"`: the full sequence. Kept positions hold exactly what the blocks
      computed (what `refill="none"` gives), and each deleted patch the mean of its kept
      neighbours (8-connected) in its image's own patch grid, or of all the image's kept patches
      when none of its neighbours is kept. Padding is never deleted, refilled or averaged. The
      next block takes the kept tokens again, so the computation is that of `refill="none"`.
    With the deletion at block 0, transformers records `hidden_states[0]` from block 0's input,
    which is then the shortened sequence."""

    REFILLS = ("none", "neighbours")

    def __init__(self, adapter: DeletionHost, block_index: int, count: int, refill: str = "none"):
        if refill not in self.REFILLS:
            raise ValueError(f"refill must be one of {self.REFILLS}, not {refill!r}")
        if count < 0:
            raise ValueError(f"cannot delete {count} tokens")
        self.adapter, self.block_index, self.count, self.refill = adapter, block_index, count, refill
        self.kept: torch.Tensor | None = None  # (batch, kept) positions kept in the last forward
        self.deleted: torch.Tensor | None = None  # (batch, count) positions deleted in the last forward
        self.length = 0  # sequence length before the deletion, in the last forward
        self.batch = 0
        self.grids: list[tuple[int, int]] | None = None  # patch grid per image, seen in this forward
        self._neighbours: torch.Tensor | None = None  # (batch, count, length) refill weights
        self._unrefilled: set[int] | None = None  # blocks of this forward whose output awaits its refill
        blocks = adapter.blocks()
        last = len(blocks) - 1
        refilled = f" and its refill of blocks {block_index}-{last}" if refill == "neighbours" else ""
        self.tally = Tally(f"the token deletion at block {block_index}{refilled}")
        handles = [blocks[block_index].register_forward_pre_hook(self._delete, with_kwargs=True)]
        # first, so that whatever watches a block's input sees what the block computes on
        handles += [
            block.register_forward_pre_hook(self._follow, with_kwargs=True, prepend=True)
            for block in blocks[block_index + 1 :]
        ]
        if refill == "neighbours":
            # first, so that whatever else watches a block's output sees the refilled sequence
            handles += [
                block.register_forward_hook(functools.partial(self._refill, index), prepend=True)
                for index, block in enumerate(blocks[block_index:], start=block_index)
            ]
            handles += adapter.watch_patch_grids(self._note_grids)
        handles += adapter.follow_deletion(self)
        self._undo = [handle.remove for handle in handles]

    def on_remove(self, undo: Callable[[], Any]) -> None:
        """Have `remove()` also call `undo` (the host forgetting the deletion)."""
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop(0)()

    def tokens_at_output(self, block_index: int, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` (batch, tokens entering the deletion, ...) for the tokens of block
        `block_index`'s output in the last forward."""
        if block_index < self.block_index or self.refill == "neighbours":
            return per_token
        return take_tokens(per_token, self.kept, 1)

    # what one forward leaves for the blocks after the deletion (quantsink.models.handles.ForwardState)
    _PER_FORWARD = ("kept", "deleted", "length", "batch", "grids", "_neighbours", "_unrefilled")

    def forward_state(self) -> dict[str, Any]:
        return {name: copy.copy(getattr(self, name)) for name in self._PER_FORWARD}

    def load_forward_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, copy.copy(value))

    def _note_grids(self, grids: list[tuple[int, int]]) -> None:
        self.grids = grids

    def _delete(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0]
        mask = self.adapter.call_mask(args, kwargs)
        self.batch, self.length = hidden.shape[:2]
        padding = torch.zeros(self.batch, self.length, dtype=torch.bool, device=hidden.device)
        if mask is not None:
            padding = key_padding(mask, self.batch)
        deletable = ~padding
        deletable[:, : self.adapter.num_prefix_tokens] = False
        count = min(self.count, int(deletable.sum(dim=-1).min()))
        norms = hidden.abs().amax(dim=-1).masked_fill(~deletable, float("-inf"))
        keep = torch.ones_like(deletable).scatter_(1, norms.topk(count, dim=-1).indices, False)
        self.kept = keep.nonzero()[:, 1].view(self.batch, self.length - count)
        self.deleted = (~keep).nonzero()[:, 1].view(self.batch, count)
        if self.refill == "neighbours":
            self._neighbours = self._neighbour_weights(keep, padding, hidden.dtype)
            self._unrefilled = set(range(self.block_index, self.adapter.num_blocks))
        else:
            self.tally.ran()
        return self.adapter.with_call(
            args, kwargs, take_tokens(hidden, self.kept, 1), None if mask is None else take_mask(mask, self.kept)
        )

    def _follow(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        hidden, mask = args[0], self.adapter.call_mask(args, kwargs)
        refilled = hidden.shape[1] == self.length and self.kept.shape[1] != self.length
        if refilled:  # the previous block's refilled output: the blocks compute on the kept tokens
            hidden = take_tokens(hidden, self.kept, 1)
        if mask is not None and mask.shape[-1] != hidden.shape[1]:
            mask = take_mask(mask, self.kept)
        elif not refilled:
            return None
        return self.adapter.with_call(args, kwargs, hidden, mask)

    def _refill(self, block_index: int, _module: nn.Module, _args: tuple, output: Any) -> Any:
        hidden = hidden_states_of(output)
        full = hidden
        if hidden.shape[1] != self.length:
            width = hidden.shape[-1]
            full = hidden.new_zeros(self.batch, self.length, width)
            full.scatter_(1, self.kept[..., None].expand(-1, -1, width), hidden)
            means = torch.bmm(self._neighbours.to(hidden.dtype), full)
            full.scatter_(1, self.deleted[..., None].expand(-1, -1, width), means)
        if self._unrefilled is not None:
            self._unrefilled.discard(block_index)
            if block_index == self.adapter.num_blocks - 1:
                if not self._unrefilled:
                    self.tally.ran()
                self._unrefilled = None
        if full is hidden:
            return None
        return full if isinstance(output, torch.Tensor) else (full, *output[1:])

    def _neighbour_weights(self, keep: torch.Tensor, padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, count, length): row i of image b averages the tokens whose mean refills
        `deleted[b, i]` (its kept grid neighbours, else all the image's kept patches)."""
        grids, self.grids = self.grids, None  # each forward must show its own grids
        start, device = self.adapter.num_prefix_tokens, keep.device
        if grids is None or len(grids) != self.batch:
            seen = "no patch grid for this batch" if grids is None else f"patch grids for {len(grids)} of {self.batch} images"
            raise NotRunError(
                f"the token deletion at block {self.block_index} of {self.adapter.family} saw {seen}: "
                "refill: neighbours cannot tell which patches neighbour which; use refill: none or report it"
            )
        rows, columns = (torch.tensor(side, device=device) for side in zip(*grids))
        positions = torch.arange(self.length, device=device)
        patches = (positions >= start) & (positions < start + (rows * columns)[:, None])
        real = ~padding
        real[:, :start] = False
        mismatched = (patches != real).any(dim=-1).nonzero()
        if len(mismatched):
            image = int(mismatched[0])
            (grid_rows, grid_columns), patch_tokens = grids[image], int(real[image].sum())
            raise UserError(
                f"refill: neighbours cannot refill {self.adapter.family}: image {image} has {patch_tokens} patch "
                f"tokens after its {start} leading ones, but its patch grid is {grid_rows}x{grid_columns}; use refill: none"
            )
        offsets = torch.tensor([(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1) if r or c], device=device)
        wide = columns[:, None, None]
        row = (self.deleted - start)[..., None] // wide + offsets[:, 0]
        column = (self.deleted - start)[..., None] % wide + offsets[:, 1]
        inside = (row >= 0) & (row < rows[:, None, None]) & (column >= 0) & (column < wide)
        neighbour = torch.where(inside, start + row * wide + column, 0)
        kept_neighbour = inside & keep.gather(1, neighbour.flatten(1)).view(neighbour.shape)
        weights = torch.zeros(*self.deleted.shape, self.length, dtype=dtype, device=device)
        weights.scatter_add_(2, neighbour, kept_neighbour.to(dtype))
        lonely = weights.sum(dim=-1, keepdim=True) == 0
        weights = torch.where(lonely, (patches & keep).to(dtype)[:, None, :], weights)
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)
