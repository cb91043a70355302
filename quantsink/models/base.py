"""The Adapter: the only code that knows a model family.

Everything else in quantsink (calibration, methods, quantizers, export) sees a model through
this view: its transformer blocks, each block's attention and MLP projections, how many special
tokens lead the sequence, how raw samples become model inputs, and which output is the
embedding that fidelity is measured on.

It also offers the few sequence edits that sink-aware methods (RegCache) need, the same for
every family: keys and values prepended to a block's self-attention (`set_kv_prefix`), a look at
each block's keys and values (`observing_kv`), deletion of the largest tokens at a block's input
(`delete_tokens_at`), and running the model from a block on cached hidden states (`hidden_before`,
`run_from`). Each family only hands its attention call to `attend` (with the query, keys, values,
mask and softmax scale it computed) and says which masks travel beside the hidden states.
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from quantsink.errors import UserError
from quantsink.models.probe import Tally
from quantsink.registry import Registry


@dataclass
class ModelSource:
    """Where a model came from and how to rebuild its architecture without downloading.

    `spec` is what the user typed (short name, hf:..., open_clip:..., timm:..., folder);
    `config` is a JSON-serialisable description that `Adapter.from_config` turns back into the
    same architecture with random weights, so a saved folder can be reloaded offline.
    """

    family: str
    spec: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "spec": self.spec, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSource":
        return cls(family=data["family"], spec=data["spec"], config=dict(data.get("config", {})))


@dataclass
class KVPrefix:
    """Keys and values put in front of a self-attention's own, the same for every sequence of the
    batch: `keys` and `values` are (heads, entries, head_dim). They produce no output token and
    nothing updates them. `log_weights` (entries,) is added to each entry's attention logit:
    log(n) makes an entry count as n identical copies (same softmax, same output), -inf takes it
    out of the softmax."""

    keys: torch.Tensor
    values: torch.Tensor
    log_weights: torch.Tensor | None = None
    tally: Tally | None = None  # records every attention call the prefix takes part in


@dataclass
class AttentionEdits:
    """What is changed in one self-attention: a prefix, and observers of its keys and values.
    Kept on the attention module as a plain attribute, so it never enters the state_dict."""

    prefix: KVPrefix | None = None
    observers: list[Callable[[torch.Tensor, torch.Tensor], None]] = field(default_factory=list)


EDITS_ATTRIBUTE = "quantsink_attention_edits"


# The family's own attention call over (batch, heads, tokens, head_dim) keys and values with its
# mask: (keys, values, mask) -> (batch, heads, queries, head_dim).
AttentionCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def attend(
    module: nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    attention: AttentionCall,
) -> torch.Tensor:
    """Where every family's self-attention runs: `attention(keys, values, mask)` is the family's
    own kernel call for `query`, on keys and values after projection and any key norm; `scale`
    is its softmax scale. Observers see the keys and values. A prefix is cascade attention (as
    in FlashInfer and Hydragen): the kernel runs over the sequence's own keys exactly as without
    a prefix, the prefix entries, shared by the batch, are attended apart, and the two results
    are merged by the logsumexp of their logits, which the kernel call gives on the side. So a
    prefix whose weight is zero changes nothing, bit for bit. Without edits: the kernel call."""
    edits = module.__dict__.get(EDITS_ATTRIBUTE)
    if edits is None:
        return attention(keys, values, mask)
    for observer in edits.observers:
        observer(keys, values)
    if edits.prefix is None:
        return attention(keys, values, mask)
    with _KernelLogSumExp(keys.shape[-2]) as kernel:
        output = attention(keys, values, mask)
    if kernel.logsumexp is None or kernel.logsumexp.shape != output.shape[:-1]:
        raise RuntimeError(
            f"the attention kernel of {type(module).__name__} runs no softmax over its keys that quantsink can see: "
            "a key/value prefix cannot be merged with its output"
        )
    if edits.prefix.tally is not None:
        edits.prefix.tally.ran()
    prefix_output, prefix_logsumexp = _attend_prefix(query, edits.prefix, scale)
    # the prefix's share of the softmax over both parts, the sequence's being 1 - share: lerp
    # gives output + share * (prefix_output - output) in one pass, exact at both ends. A prefix
    # weighted out has logsumexp -inf, a share of exactly 0: the kernel's output comes back as is.
    prefix_share = torch.sigmoid(prefix_logsumexp - kernel.logsumexp)[..., None]
    return torch.lerp(output, prefix_output.to(output.dtype), prefix_share.to(output.dtype))


def _attend_prefix(query: torch.Tensor, prefix: KVPrefix, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, queries, head_dim) attention output of `query` over the prefix alone, and
    the (batch, heads, queries) logsumexp of its logits."""
    logits = torch.einsum("bhqd,hpd->bhqp", query, prefix.keys.to(query))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    if prefix.log_weights is not None:
        logits = logits + prefix.log_weights.to(logits)
    logsumexp = logits.logsumexp(dim=-1)
    # with every entry weighted out, -inf - (-inf) would put NaN where the share is 0
    probabilities = torch.exp(logits - torch.where(logsumexp.isneginf(), 0.0, logsumexp)[..., None])
    return torch.einsum("bhqp,hpd->bhqd", probabilities.to(query.dtype), prefix.values.to(query)), logsumexp


class _KernelLogSumExp(TorchFunctionMode):
    """While an attention kernel runs within it, the logsumexp over the key axis of the logits
    the kernel normalises is noted, its result unchanged: from F.scaled_dot_product_attention
    (see `sdpa_with_logsumexp`) or from the softmax of an eager kernel."""

    SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)

    def __init__(self, key_length: int):
        super().__init__()
        self.key_length = key_length
        self.logsumexp: torch.Tensor | None = None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output, logsumexp = sdpa_with_logsumexp(*args, **kwargs)
            self._note(logsumexp)
            return output
        if func in self.SOFTMAXES:
            logits, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is not None and dim % logits.dim() == logits.dim() - 1 and logits.shape[-1] == self.key_length:
                self._note(logits.to(torch.promote_types(logits.dtype, torch.float32)).logsumexp(dim=-1))
        return func(*args, **kwargs)

    def _note(self, logsumexp: torch.Tensor) -> None:
        if self.logsumexp is not None:
            raise RuntimeError("the attention kernel ran two softmaxes over its keys: a key/value prefix cannot be merged with it")
        self.logsumexp = logsumexp


def sdpa_with_logsumexp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """F.scaled_dot_product_attention's output, bit for bit, and the (..., queries) logsumexp of its
    scaled, masked logits. Where F.scaled_dot_product_attention itself would run the CPU flash
    kernel, that kernel is called as it calls it (boolean masks made additive) and gives the
    logsumexp for free; elsewhere the output comes from F.scaled_dot_product_attention and the
    logsumexp is computed from the logits."""
    plain = all(type(tensor) is torch.Tensor for tensor in (query, key, value, attn_mask) if tensor is not None)
    if plain and query.device.type == "cpu" and not enable_gqa and SDPBackend(torch._fused_sdp_choice(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale
    )) == SDPBackend.FLASH_ATTENTION:
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return output, logsumexp
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    logits = torch.matmul(query, key.transpose(-2, -1))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if is_causal:
        logits = logits.masked_fill(~torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril(), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return output, logits.logsumexp(dim=-1)


def take_tokens(x: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` with only the `kept` (batch, n) positions along `dim`, in their order; a batch
    dimension of 1 is broadcast."""
    dim = dim % x.dim()
    x = x.expand(kept.shape[0], *x.shape[1:])
    shape = [kept.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = kept.shape[1]
    sizes = [kept.shape[1] if axis == dim else size for axis, size in enumerate(x.shape)]
    return x.gather(dim, kept.view(shape).expand(sizes))


def _take_mask(mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A (batch, heads, queries, keys) attention mask re-indexed to the kept tokens."""
    if mask.shape[-2] != 1:
        mask = take_tokens(mask, kept, -2)
    return take_tokens(mask, kept, -1)


def _key_padding(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, keys): keys that a (batch, heads, queries, keys) mask hides from every query."""
    mask = mask.expand(batch, *mask.shape[1:])
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    return hidden.flatten(1, -2).all(dim=1)


class _Reached(Exception):
    """Stops a forward pass once the wanted hidden states are known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _Skipped(nn.Module):
    """Stands in for a block that a resumed forward does not run."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden


class Adapter(ABC):
    family: ClassVar[str]
    modality: ClassVar[str]  # "image" or "text": which calibration samples it takes
    has_kv_cache: ClassVar[bool] = False  # a causal LM: generates through a KV cache (quantsink.kv_cache)

    def __init__(self, model: nn.Module, source: ModelSource):
        self.model = model.eval()
        self.source = source
        self._deletions: list[TokenDeletion] = []  # in force, see delete_tokens_at

    # --- construction -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether an in-memory module belongs to this family."""

    @classmethod
    @abstractmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>") -> "Adapter":
        """Wrap a module the user built or loaded themselves."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any], assets_dir: Path | None = None) -> "Adapter":
        """Rebuild the architecture (random weights) from `ModelSource.config`; `assets_dir` is a
        folder `save_assets` wrote (tokenizer, image-processor files), when there is one."""

    def save_assets(self, folder: Path) -> None:
        """Write beside the weights what preprocessing needs and the config cannot carry
        (tokenizer files, image-processor config), so `from_config` can rebuild offline."""

    # --- structure ----------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in order; their outputs are the residual stream."""

    @abstractmethod
    def attention(self, block_index: int) -> nn.Module:
        """The self-attention module of a block."""

    @abstractmethod
    def fc1(self, block_index: int) -> nn.Linear:
        """The MLP's first projection of a block."""

    @abstractmethod
    def fc2(self, block_index: int) -> nn.Linear:
        """The MLP's output projection of a block (where massive activations enter)."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Special tokens (CLS, registers) leading every sequence; never deleted or pruned."""

    # --- data ---------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Raw samples (PIL images or strings) -> a batch of model inputs, with the
        preprocessing the model was trained with; text is cut at `max_length` tokens when given
        (images ignore it)."""

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the model and return the (batch, dim) embedding fidelity is measured on."""

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """The smallest input of the model, for the probe forwards that prove what quantsink
        installed runs (quantsink.models.probe): one tiny image, preprocessed as any other."""
        return self.preprocess([Image.new("RGB", (32, 32), (124, 116, 104))])

    def token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(batch, tokens) bool mask of real tokens in block outputs, or None when all are real;
        with tokens deleted, `block_output_tokens` gives it for a block's output."""
        return None

    def block_output_tokens(self, block_index: int, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` (batch, tokens, ...), one entry per token of the full sequence (e.g. the
        `token_mask`), for the tokens of block `block_index`'s output in the last forward: the
        ones the token deletions in force kept there."""
        for deletion in sorted(self._deletions, key=lambda deletion: deletion.block_index):
            per_token = deletion.tokens_at_output(block_index, per_token)
        return per_token

    # --- sequence edits (RegCache) -------------------------------------------------------
    def set_kv_prefix(self, block_index: int, prefix: KVPrefix | None) -> None:
        """Put `prefix` in front of the keys and values of a block's self-attention, for every
        sequence (None takes it away)."""
        self._attention_edits(block_index).prefix = prefix

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
                self._attention_edits(index).observers.append(callback)
                added.append((index, callback))
            yield
        finally:
            for index, callback in added:
                self._attention_edits(index).observers.remove(callback)

    def delete_tokens_at(self, block_index: int, count: int, refill: str = "none") -> "TokenDeletion":
        """Delete, per sequence, the `count` tokens of largest l_inf norm at the input of block
        `block_index` (see TokenDeletion); `.remove()` the returned handle to undo it."""
        return TokenDeletion(self, block_index, count, refill)

    @torch.no_grad()
    def hidden_before(
        self, block_index: int, inputs: dict[str, torch.Tensor], resume: tuple[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The residual stream entering block `block_index` for `inputs`, before any edit of that
        block (`num_blocks`: the stream leaving the last block). With `resume=(start, hidden)` the
        blocks before `start` are not run: `hidden` (what this method gave for `start`) enters
        block `start` instead. Nothing after the wanted point runs."""
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

    def _attention_edits(self, block_index: int) -> AttentionEdits:
        module = self._editable_attention(block_index)
        edits = module.__dict__.get(EDITS_ATTRIBUTE)
        if edits is None:
            edits = AttentionEdits()
            setattr(module, EDITS_ATTRIBUTE, edits)
        return edits

    # --- what a family tells the sequence edits -------------------------------------------
    def _editable_attention(self, block_index: int) -> nn.Module:
        """The module of a block whose attention runs through `attend`, made to do so."""
        raise UserError(f"the {self.family} adapter cannot edit attention (no key/value prefix, no KV observers)")

    def _call_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The (batch, heads, queries, keys) attention mask a block is called with, if any."""
        return None

    def _with_call(
        self, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        """A block's call arguments with other hidden states and mask."""
        return (hidden, *args[1:]), kwargs

    def _follow_deletion(self, deletion: "TokenDeletion") -> list[RemovableHandle]:
        """Hooks that keep per-token state beyond the blocks (a pooling head's mask) in step with
        a deletion."""
        return []

    def _patch_grids(self, deletion: "TokenDeletion") -> list[tuple[int, int]]:
        """(rows, columns) of the patch grid of each sequence of the current batch, patches
        following the leading special tokens in row-major order."""
        patches = deletion.length - self.num_prefix_tokens
        side = math.isqrt(patches)
        if side * side != patches:
            raise UserError(
                f"refill: neighbours needs a square patch grid, but {self.family} has {patches} patch tokens: use refill: none"
            )
        return [(side, side)] * deletion.batch

    # --- helpers shared by every family -------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def block_names(self) -> list[str]:
        names = {id(module): name for name, module in self.model.named_modules()}
        return [names[id(block)] for block in self.blocks()]


ADAPTERS: Registry[type[Adapter]] = Registry("model family")


def register_adapter(adapter: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an Adapter under its own `family` name."""
    return ADAPTERS.register(adapter.family)(adapter)


def hidden_states_of(block_output: Any) -> torch.Tensor:
    """A block's residual-stream output, whatever tuple or object the family wraps it in."""
    if isinstance(block_output, torch.Tensor):
        return block_output
    if isinstance(block_output, (tuple, list)):
        return block_output[0]
    raise TypeError(f"cannot find hidden states in a block output of type {type(block_output).__name__}")


def _bound_observer(observer: Callable[[int, torch.Tensor, torch.Tensor], None], index: int):
    return lambda keys, values: observer(index, keys, values)


class TokenDeletion:
    """Per sequence, the `count` tokens of largest l_inf norm are deleted at the input of block
    `block_index` (never the leading special tokens, never padding): from that block on the
    sequence is shorter, and the masks that travel beside it are re-indexed to match.
    `refill="neighbours"` gives the last block's output its full length back, each deleted
    patch replaced by the mean of its kept neighbours in the patch grid (for dense outputs).
    `remove()` undoes it. Resuming a forward after the deletion block reuses the positions of
    the previous forward."""

    REFILLS = ("none", "neighbours")

    def __init__(self, adapter: Adapter, block_index: int, count: int, refill: str = "none"):
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
        self._handles = [blocks[block_index].register_forward_pre_hook(self._delete, with_kwargs=True)]
        self._handles += [block.register_forward_pre_hook(self._follow, with_kwargs=True) for block in blocks[block_index + 1 :]]
        if refill == "neighbours":
            # first, so that whatever else watches the last block sees the refilled sequence
            self._handles.append(blocks[-1].register_forward_hook(self._refill, prepend=True))
        self._handles += adapter._follow_deletion(self)
        adapter._deletions.append(self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self in self.adapter._deletions:
            self.adapter._deletions.remove(self)

    def tokens_at_output(self, block_index: int, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` (batch, tokens entering the deletion, ...) for the tokens of block
        `block_index`'s output in the last forward."""
        refilled = self.refill == "neighbours" and block_index == self.adapter.num_blocks - 1
        if block_index < self.block_index or refilled:
            return per_token
        return take_tokens(per_token, self.kept, 1)

    def _delete(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0]
        mask = self.adapter._call_mask(args, kwargs)
        self.batch, self.length = hidden.shape[:2]
        deletable = torch.ones(self.batch, self.length, dtype=torch.bool, device=hidden.device)
        deletable[:, : self.adapter.num_prefix_tokens] = False
        if mask is not None:
            deletable &= ~_key_padding(mask, self.batch)
        count = min(self.count, int(deletable.sum(dim=-1).min()))
        self.tally.ran()
        norms = hidden.abs().amax(dim=-1).masked_fill(~deletable, float("-inf"))
        keep = torch.ones_like(deletable).scatter_(1, norms.topk(count, dim=-1).indices, False)
        self.kept = keep.nonzero()[:, 1].view(self.batch, self.length - count)
        return self.adapter._with_call(
            args, kwargs, take_tokens(hidden, self.kept, 1), None if mask is None else _take_mask(mask, self.kept)
        )

    def _follow(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        mask = self.adapter._call_mask(args, kwargs)
        if mask is None or mask.shape[-1] == args[0].shape[1]:
            return None
        return self.adapter._with_call(args, kwargs, args[0], _take_mask(mask, self.kept))

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
        for image, (rows, columns) in enumerate(self.adapter._patch_grids(self)):
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
