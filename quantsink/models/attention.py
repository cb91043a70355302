"""Attention edits: what quantsink changes inside a self-attention, the same for every family.

Each family hands its attention call to `attend` with the query, keys, values, mask and softmax
scale it computed. Observers see the keys and values; a key/value prefix (RegCache's registers)
is cascade attention: the family's kernel runs over the sequence's own keys as without a prefix,
the prefix is attended apart, and the two results are merged by the logsumexp of their logits,
which `sdpa_with_logsumexp` or the kernel's own softmax gives on the side.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from quantsink.models.probe import Tally


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


def edits_of(module: nn.Module) -> AttentionEdits:
    """The edits of an attention module that runs through `attend`, created empty on first use."""
    edits = module.__dict__.get(EDITS_ATTRIBUTE)
    if edits is None:
        edits = AttentionEdits()
        setattr(module, EDITS_ATTRIBUTE, edits)
    return edits


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
