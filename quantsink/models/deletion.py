"""Token deletion: per sequence, the tokens of largest l_inf norm leave at a block's input.

`TokenDeletion` hooks the blocks; what it needs of a family (where a block's call carries its
attention mask, how to rebuild that call, the patch grid, any per-token state beyond the blocks)
is the small public `DeletionHost` protocol, which `EditableEncoderAdapter` implements.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantsink.models.base import hidden_states_of
from quantsink.models.probe import Tally


class DeletionHost(Protocol):
    """What a token deletion needs of the adapter of the model it edits."""

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

    def patch_grids(self, deletion: "TokenDeletion") -> list[tuple[int, int]]:
        """(rows, columns) of the patch grid of each sequence of the current batch, patches
        following the leading special tokens in row-major order."""


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
    sequence is shorter, and the masks that travel beside it are re-indexed to match.
    `refill="neighbours"` gives the last block's output its full length back, each deleted
    patch replaced by the mean of its kept neighbours in the patch grid (for dense outputs).
    `remove()` undoes it. Resuming a forward after the deletion block reuses the positions of
    the previous forward."""

    REFILLS = ("none", "neighbours")

    def __init__(self, adapter: DeletionHost, block_index: int, count: int, refill: str = "none"):
        if refill not in self.REFILLS:
            raise ValueError(f"refill must be one of {self.REFILLS}, not {refill!r}")
        if count < 0:
            raise ValueError(f"cannot delete {count} tokens")
        self.adapter, self.block_index, self.count, self.refill = adapter, block_index, count, refill
        self.kept: torch.Tensor | None = None  # (batch, kept) positions kept in the last forward
        self.length = 0  # sequence length before the deletion, in the last forward
        self.batch = 0
        self.grids: list[tuple[int, int]] = []  # patch grid per sequence, for families whose grids vary
        self.tally = Tally(f"the token deletion at block {block_index}")
        blocks = adapter.blocks()
        handles = [blocks[block_index].register_forward_pre_hook(self._delete, with_kwargs=True)]
        handles += [block.register_forward_pre_hook(self._follow, with_kwargs=True) for block in blocks[block_index + 1 :]]
        if refill == "neighbours":
            # first, so that whatever else watches the last block sees the refilled sequence
            handles.append(blocks[-1].register_forward_hook(self._refill, prepend=True))
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
        refilled = self.refill == "neighbours" and block_index == self.adapter.num_blocks - 1
        if block_index < self.block_index or refilled:
            return per_token
        return take_tokens(per_token, self.kept, 1)

    def _delete(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0]
        mask = self.adapter.call_mask(args, kwargs)
        self.batch, self.length = hidden.shape[:2]
        deletable = torch.ones(self.batch, self.length, dtype=torch.bool, device=hidden.device)
        deletable[:, : self.adapter.num_prefix_tokens] = False
        if mask is not None:
            deletable &= ~key_padding(mask, self.batch)
        count = min(self.count, int(deletable.sum(dim=-1).min()))
        self.tally.ran()
        norms = hidden.abs().amax(dim=-1).masked_fill(~deletable, float("-inf"))
        keep = torch.ones_like(deletable).scatter_(1, norms.topk(count, dim=-1).indices, False)
        self.kept = keep.nonzero()[:, 1].view(self.batch, self.length - count)
        return self.adapter.with_call(
            args, kwargs, take_tokens(hidden, self.kept, 1), None if mask is None else take_mask(mask, self.kept)
        )

    def _follow(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        mask = self.adapter.call_mask(args, kwargs)
        if mask is None or mask.shape[-1] == args[0].shape[1]:
            return None
        return self.adapter.with_call(args, kwargs, args[0], take_mask(mask, self.kept))

    def _refill(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        hidden = hidden_states_of(output)
        if hidden.shape[1] == self.length:
            return None
        full = self._neighbour_refill(hidden)
        return full if isinstance(output, torch.Tensor) else (full, *output[1:])

    def _neighbour_refill(self, hidden: torch.Tensor) -> torch.Tensor:
        width = hidden.shape[-1]
        full = hidden.new_zeros(self.batch, self.length, width)
        full.scatter_(1, self.kept[..., None].expand(-1, -1, width), hidden)
        present = torch.zeros(self.batch, self.length, dtype=hidden.dtype, device=hidden.device).scatter_(1, self.kept, 1.0)
        start = self.adapter.num_prefix_tokens
        ring = torch.ones(1, 1, 3, 3, dtype=hidden.dtype, device=hidden.device)
        ring[..., 1, 1] = 0
        for image, (rows, columns) in enumerate(self.adapter.patch_grids(self)):
            patches = slice(start, start + rows * columns)
            here = present[image, patches].view(1, 1, rows, columns)
            grid = full[image, patches].T.reshape(1, width, rows, columns)
            sums = F.conv2d(grid, ring.expand(width, 1, 3, 3), padding=1, groups=width)
            counts = F.conv2d(here, ring, padding=1)
            fallback = grid.sum(dim=(2, 3), keepdim=True) / here.sum().clamp(min=1)
            means = torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
            filled = torch.where(here > 0, grid, means)
            full[image, patches] = filled.reshape(width, -1).T
        return full
