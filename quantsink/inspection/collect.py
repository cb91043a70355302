"""The inspection pass: hooks that reduce each batch as it goes, so that memory stays bounded by
one batch's activations of one layer whatever the number of samples.

Per block (its output, the residual stream): the largest token l_inf norm, the median token's
(mean over batches, as RegCache's profile counts it) and how many tokens are massive (above
MASSIVE_RATIO times their batch's median, RegCache's criterion), the median token RMS (KVSink's typical
token scale), each channel's absmax, the five largest tokens; the token l_inf norms of the first
`shown` samples, for the heatmaps. Per targeted Linear: its input's largest |x| and median
token l_inf norm (RegCache's input outlier ratio, which its choice of l_q reads). Per block's
attention: the share of attention each token receives (mean over heads and real queries), kept
for the shown samples, and the largest share one token receives in each sample.

Attention is read where every family computes it, by a TorchFunctionMode that sees the
attention module's `scaled_dot_product_attention` or softmax (as quantsink.models.attention
reads the kernel's logsumexp): no family code, and the model's output is unchanged."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from quantsink.calibration import finite_block_output
from quantsink.methods.regcache.profile import MASSIVE_RATIO
from quantsink.models.base import Adapter
from quantsink.models.handles import HandleSet
from quantsink.models.probe import Tally, require_runs

TOP_TOKENS = 5
TOP_CHANNELS = 8


@dataclass
class BlockStream:
    """What one block's outputs showed, reduced batch by batch."""

    max_token_linf: float = 0.0
    medians: list[float] = field(default_factory=list)  # per batch: the median token l_inf
    rms_medians: list[float] = field(default_factory=list)  # per batch: the median token RMS
    channel_absmax: Optional[torch.Tensor] = None
    top_tokens: list[tuple[float, int, int]] = field(default_factory=list)  # (l_inf, sample, token)
    shown: list[torch.Tensor] = field(default_factory=list)  # token l_inf of the shown samples
    received: list[torch.Tensor] = field(default_factory=list)  # attention received, shown samples
    largest_share: list[float] = field(default_factory=list)  # per batch: sum over its samples
    attention_samples: int = 0
    massive_tokens: int = 0  # tokens above MASSIVE_RATIO x their batch's median token l_inf
    most_massive_in_a_sample: int = 0

    def median_token_linf(self) -> float:
        return sum(self.medians) / len(self.medians)

    def token_scale(self) -> float:
        return max(sum(self.rms_medians) / len(self.rms_medians), 1e-12)

    def summary(self, name: str) -> dict[str, Any]:
        """The block as ActivationStats.block_summary describes one (the quantize report's
        `outliers`), plus each top channel's ratio to the median token RMS."""
        median = self.median_token_linf()
        values, channels = self.channel_absmax.topk(min(TOP_CHANNELS, self.channel_absmax.numel()))
        scale = self.token_scale()
        return {
            "block": name,
            "max_token_linf": self.max_token_linf,
            "median_token_linf": median,
            "max_over_median": self.max_token_linf / max(median, 1e-12),
            "top_tokens": [{"sample": sample, "token": token, "linf": linf} for linf, sample, token in self.top_tokens],
            "top_channels": [{"channel": int(c), "absmax": float(v), "over_token_rms": float(v) / scale}
                             for v, c in zip(values, channels)],
            "median_token_rms": scale,
            "largest_attention_share": (sum(self.largest_share) / self.attention_samples) if self.attention_samples else None,
            "massive_tokens": self.massive_tokens,
            "most_massive_tokens_in_a_sample": self.most_massive_in_a_sample,
        }


@dataclass
class LinearInputs:
    """A targeted Linear's inputs: the largest |x| and the median token l_inf (mean over batches)."""

    input_max: float = 0.0
    medians: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return self.input_max / max(sum(self.medians) / len(self.medians), 1e-12)


def received_attention(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
                       scale: Optional[float], queries: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, keys): the share of attention each key receives, averaged over heads and the
    real queries (`queries`, (batch, q) weights summing to 1 per row, or uniform). One head at a
    time, so only one head's (batch, q, keys) probabilities exist at once."""
    heads = query.shape[1]
    if key.shape[1] != heads:  # grouped-query attention
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    total = torch.zeros(query.shape[0], key.shape[-2], device=query.device)
    for head in range(heads):
        logits = (query[:, head].float() @ key[:, head].float().transpose(-1, -2)) * scale
        if is_causal:  # aligned top-left, as F.scaled_dot_product_attention aligns it
            lower = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~lower, float("-inf"))
        if mask is not None:
            head_mask = mask[:, min(head, mask.shape[1] - 1)] if mask.dim() == 4 else mask
            logits = logits.masked_fill(~head_mask, float("-inf")) if head_mask.dtype == torch.bool else logits + head_mask.float()
        total += _weighted_by_query(torch.softmax(logits, dim=-1).nan_to_num(0.0), queries)
    return total / heads


def _weighted_by_query(probabilities: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, q, keys) -> (batch, keys), the mean over queries weighted by `queries`."""
    if queries is None or queries.shape[-1] != probabilities.shape[-2]:
        return probabilities.mean(dim=-2).cpu()
    return (probabilities * queries[:, :, None].to(probabilities)).sum(dim=-2).cpu()


class _AttentionReader(TorchFunctionMode):
    """Within the inspection pass: whenever the attention module of a block runs its kernel (an
    F.scaled_dot_product_attention or a softmax over the keys), the attention each key receives
    goes to `record(block, received)`; the kernel's result is returned unchanged."""

    SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)

    def __init__(self, record: Callable[[int, torch.Tensor], None]):
        super().__init__()
        self.record = record
        self.block: Optional[int] = None
        self.queries: Optional[torch.Tensor] = None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        fused = func is F.scaled_dot_product_attention
        eager = func in self.SOFTMAXES and isinstance(result, torch.Tensor) and result.dim() == 4
        if self.block is None or not (fused or eager):
            return result
        block, self.block = self.block, None  # one kernel per attention call: a later softmax is not over its keys
        if fused:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            given = {**dict(zip(names, args)), **kwargs}
            received = received_attention(given["query"], given["key"], given.get("attn_mask"),
                                          bool(given.get("is_causal", False)), given.get("scale"), self.queries)
        else:  # the softmax's output is the attention, (batch, heads, queries, keys)
            received = _weighted_by_query(result.float().mean(dim=1), self.queries)
        self.record(block, received)
        return result


class InspectionCollector:
    """The hooks of the inspection pass on `adapter` (module docstring); `targets`: the Linears
    a recipe would quantize; the first `shown` samples keep their per-token rows."""

    def __init__(self, adapter: Adapter, targets: list[str], shown: int):
        self.adapter = adapter
        self.block_names = adapter.block_names()
        self.blocks = [BlockStream() for _ in self.block_names]
        self.linears = {name: LinearInputs() for name in targets}
        self.shown = shown
        self.samples = 0  # samples seen before the current batch
        self.shown_texts: list[Optional[list[str]]] = []
        self.shown_inputs: list[dict[str, torch.Tensor]] = []  # one row each, for the figures
        self._real: Optional[torch.Tensor] = None
        self._reader = _AttentionReader(self._on_attention)
        self._block_tallies = [Tally(f"the inspection hook on {name}") for name in self.block_names]
        self._attention_tallies = [Tally(f"the attention reader of {name}") for name in self.block_names]

    # --- hooks ------------------------------------------------------------------------------
    def _on_block(self, index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = finite_block_output(output, self.block_names[index])
            real = self._real if self._real is not None else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            token_linf = hidden.abs().amax(dim=-1)
            tokens = hidden[real]
            stream = self.blocks[index]
            stream.max_token_linf = max(stream.max_token_linf, float(token_linf[real].max()))
            stream.medians.append(float(token_linf[real].median()))
            stream.rms_medians.append(float(tokens.pow(2).mean(dim=-1).sqrt().median()))
            absmax = tokens.abs().amax(dim=0)
            stream.channel_absmax = absmax if stream.channel_absmax is None else torch.maximum(stream.channel_absmax, absmax)
            candidates = token_linf.masked_fill(~real, float("-inf")).flatten()
            values, where = candidates.topk(min(TOP_TOKENS, candidates.numel()))
            width = token_linf.shape[1]
            stream.top_tokens = sorted(
                stream.top_tokens + [(float(v), self.samples + int(i) // width, int(i) % width) for v, i in zip(values, where)],
                reverse=True,
            )[:TOP_TOKENS]
            massive = (token_linf > MASSIVE_RATIO * stream.medians[-1]) & real
            stream.massive_tokens += int(massive.sum())
            stream.most_massive_in_a_sample = max(stream.most_massive_in_a_sample, int(massive.sum(dim=-1).max()))
            for row in range(max(0, min(self.shown - self.samples, hidden.shape[0]))):
                stream.shown.append(token_linf[row][real[row]].cpu())
            self._block_tallies[index].ran()

        return hook

    def _on_linear(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            tokens = args[0].detach().abs().amax(dim=-1)
            entry = self.linears[name]
            entry.input_max = max(entry.input_max, float(tokens.max()))
            entry.medians.append(float(tokens.median()))

        return hook

    def _enter_attention(self, index: int):
        def hook(_module: nn.Module, _args: Any) -> None:
            self._reader.block = index

        return hook

    def _leave_attention(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._reader.block = None

    def _on_attention(self, index: int, received: torch.Tensor) -> None:
        stream = self.blocks[index]
        real = self._real if self._real is not None and self._real.shape == received.shape else None
        masked = received if real is None else received.masked_fill(~real, 0.0)
        stream.largest_share.append(float(masked.amax(dim=-1).sum()))
        stream.attention_samples += received.shape[0]
        for row in range(max(0, min(self.shown - self.samples, received.shape[0]))):
            stream.received.append(received[row] if real is None else received[row][real[row]])
        self._attention_tallies[index].ran()

    # --- the pass ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self) -> Iterator["InspectionCollector"]:
        model = self.adapter.model
        with HandleSet(model, "inspection") as handles:
            for index, block in enumerate(self.adapter.blocks()):
                handles.add(block.register_forward_hook(self._on_block(index)))
            for name in self.linears:
                handles.add(model.get_submodule(name).register_forward_pre_hook(self._on_linear(name)))
            for index in range(len(self.block_names)):
                attention = self.adapter.attention(index)
                handles.add(attention.register_forward_pre_hook(self._enter_attention(index)))
                handles.add(attention.register_forward_hook(self._leave_attention))
            yield self

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor], texts: Optional[list[list[str]]]) -> None:
        """One batch through the model with the hooks attached; `texts`, each row's tokens."""
        mask = self.adapter.token_mask(inputs)
        self._real = mask.bool() if mask is not None else None
        self._reader.queries = None
        if self._real is not None:
            weights = self._real.float()
            self._reader.queries = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
        batch = len(next(iter(inputs.values())))
        for row in range(max(0, min(self.shown - self.samples, batch))):
            self.shown_inputs.append({key: value[row : row + 1] for key, value in inputs.items()})
            real = self._real[row] if self._real is not None else None
            self.shown_texts.append(None if texts is None else [t for t, keep in zip(texts[row], real.tolist()) if keep]
                                    if real is not None else texts[row])
        with self._reader:
            self.adapter.embed(inputs)
        self.samples += batch

    def run_all(self, batches: Iterator[tuple[dict[str, torch.Tensor], Optional[list[list[str]]]]]) -> None:
        """Every batch; each block's hook and attention reader must have run (no silent no-op)."""
        def every_batch() -> None:
            for inputs, texts in batches:
                self.run(inputs, texts)

        with self.attached():
            require_runs(self.adapter.model, self._block_tallies + self._attention_tallies, every_batch,
                         during="the inspection pass",
                         fix="its attention calls neither F.scaled_dot_product_attention nor a softmax quantsink can see; report it")
