"""Fidelity of a quantized model against its full-precision self, on the same inputs: embeddings
(`fidelity`), and for causal LMs the next-token predictions through a quantized KV cache under
the chunked-prefill protocol (`chunked_log_likelihood`, `compare_kv_caches`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicCache

from quantsink.errors import UserError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.models.base import Adapter
from quantsink.models.causal_lm import cache_keyword


RANK_NEIGHBOURS = 5  # rank agreement: each row's nearest neighbours compared, FP vs quantized


def centered_cosine(reference: torch.Tensor, quantized: torch.Tensor, center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row, the cosine similarity after subtracting `center` (by default the reference's mean
    row) from both. Encoder embeddings share a large common component, so plain cosine stays near
    1 whatever quantization does; centred, it measures what tells inputs apart."""
    reference, quantized = reference.double(), quantized.double()
    center = reference.mean(dim=0) if center is None else center.double()
    return F.cosine_similarity(reference - center, quantized - center, dim=-1)


def rank_agreement(reference: torch.Tensor, quantized: torch.Tensor, neighbours: int = RANK_NEIGHBOURS) -> float:
    """The mean share of each row's `neighbours` nearest other rows (by cosine) that are the same
    in full precision and quantized: label-free retrieval fidelity, 1.0 when nothing moved."""
    rows = reference.shape[0]
    if rows < 2:
        return 1.0
    neighbours = min(neighbours, rows - 1)

    def nearest(embeddings: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(embeddings.double(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-math.inf)
        return similarity.topk(neighbours, dim=-1).indices

    exact, approximate = nearest(reference), nearest(quantized)
    shared = (exact[:, :, None] == approximate[:, None, :]).any(dim=-1).sum(dim=-1)
    return (shared.double() / neighbours).mean().item()


def fidelity(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """How far `quantized` embeddings are from `reference` (same inputs, one row each): cosine
    (mean and worst), centred cosine (mean and worst; see `centered_cosine`), the relative L2
    error of the whole matrix ||quantized - reference|| / ||reference||, and rank agreement."""
    cosine = F.cosine_similarity(reference.double(), quantized.double(), dim=-1)
    centered = centered_cosine(reference, quantized)
    return {
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "centered_cosine_mean": centered.mean().item(),
        "centered_cosine_min": centered.min().item(),
        "relative_l2": ((quantized.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-12)).item(),
        "rank_agreement": rank_agreement(reference, quantized),
        "samples": reference.shape[0],
    }


@torch.no_grad()
def embed_batches(adapter: Adapter, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The adapter's embedding of every preprocessed batch, concatenated in order."""
    return torch.cat([adapter.embed(inputs) for inputs in batches])


@dataclass(frozen=True)
class KVComparison:
    """A quantized KV cache against the full-precision reference on the same text (see
    `compare_kv_caches`): perplexity under each, the mean per-token KL(reference || quantized)
    of the next-token distributions, and the number of predicted tokens all three average over."""

    perplexity_reference: float
    perplexity_quantized: float
    kl_mean: float
    tokens: int

    @classmethod
    def combine(cls, parts: Sequence["KVComparison"]) -> "KVComparison":
        """One comparison over the tokens of all `parts` (e.g. one per batch), token-weighted."""
        tokens = sum(part.tokens for part in parts)

        def mean(value: Callable[["KVComparison"], float]) -> float:
            return sum(value(part) * part.tokens for part in parts) / max(tokens, 1)

        return cls(
            perplexity_reference=math.exp(mean(lambda part: math.log(part.perplexity_reference))),
            perplexity_quantized=math.exp(mean(lambda part: math.log(part.perplexity_quantized))),
            kl_mean=mean(lambda part: part.kl_mean),
            tokens=tokens,
        )


class _Chunk(NamedTuple):
    """One chunk of the chunked-prefill protocol: float32 log-probabilities (batch, n, vocab) of
    the next token at its n positions that have one, those next tokens (batch, n), and which of
    them count (neither the target nor its predicting token is padding)."""

    log_probs: torch.Tensor
    targets: torch.Tensor
    counted: torch.Tensor


def _chunked_prefill(
    model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int, attention_mask: Optional[torch.Tensor]
) -> Iterator[_Chunk]:
    """Feed `input_ids` through the empty `cache` in chunks of `chunk_size` tokens, one `_Chunk`
    per forward call; position ids are each row's real-token index, as in `generate`."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be positive, got {chunk_size}")
    if cache.get_seq_length() > 0:
        raise UserError("the chunked evaluation needs an empty cache: pass a new one or call cache.reset()")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if isinstance(cache, SinkQuantizedCache):
        cache.set_attention_mask(attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    keyword = cache_keyword(model)
    real = attention_mask.bool()
    counted = real[:, 1:] & real[:, :-1]
    for start in range(0, input_ids.shape[1], chunk_size):
        end = start + chunk_size
        logits = model(
            input_ids=input_ids[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end],
            **{keyword: cache},
            use_cache=True,
        ).logits
        targets = input_ids[:, start + 1 : end + 1]  # the last position has nothing to predict
        log_probs = torch.log_softmax(logits[:, : targets.shape[1]].float(), dim=-1)
        yield _Chunk(log_probs, targets, counted[:, start : start + targets.shape[1]])


@torch.no_grad()
def chunked_log_likelihood(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    chunk_size: int = 16,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log-probability of every token given the tokens before it, (batch, length - 1), with the
    sequence fed through `cache` in chunks of `chunk_size` tokens: each chunk attends to itself
    in full precision and to every earlier chunk as the cache stores it, so quantization error in
    the cache shows up in the predictions (the chunked-prefill protocol). Position ids are each
    row's real-token index, as in `generate`. Entries whose target or predicting token is padding
    (so also each left-padded row's first real token) are 0. `cache` must be empty; a
    `SinkQuantizedCache` gets `attention_mask` through `set_attention_mask`."""
    picked = [
        chunk.log_probs.gather(-1, chunk.targets.unsqueeze(-1)).squeeze(-1).masked_fill(~chunk.counted, 0.0)
        for chunk in _chunked_prefill(model, input_ids, cache, chunk_size, attention_mask)
    ]
    return torch.cat(picked, dim=1)


@torch.no_grad()
def compare_kv_caches(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    chunk_size: int = 16,
    attention_mask: Optional[torch.Tensor] = None,
    reference: Optional[Cache] = None,
) -> KVComparison:
    """`cache` against `reference` (a fresh `DynamicCache` by default), both empty, fed the same
    text in lockstep under the chunked-prefill protocol of `chunked_log_likelihood` and with its
    masking: only one chunk's logits per cache exist at a time."""
    reference = reference if reference is not None else DynamicCache()
    totals = {"reference": 0.0, "quantized": 0.0, "kl": 0.0, "tokens": 0}
    for exact, quantized in zip(
        _chunked_prefill(model, input_ids, reference, chunk_size, attention_mask),
        _chunked_prefill(model, input_ids, cache, chunk_size, attention_mask),
    ):
        targets, counted = exact.targets.unsqueeze(-1), exact.counted
        totals["reference"] += float(exact.log_probs.gather(-1, targets).squeeze(-1)[counted].sum())
        totals["quantized"] += float(quantized.log_probs.gather(-1, targets).squeeze(-1)[counted].sum())
        kl = F.kl_div(quantized.log_probs, exact.log_probs, reduction="none", log_target=True).sum(-1)
        totals["kl"] += float(kl[counted].sum())
        totals["tokens"] += int(counted.sum())
    tokens = totals["tokens"]
    if tokens == 0:
        raise UserError("compare_kv_caches has no token to predict: give it rows of at least two real tokens")
    return KVComparison(
        perplexity_reference=math.exp(-totals["reference"] / tokens),
        perplexity_quantized=math.exp(-totals["quantized"] / tokens),
        kl_mean=totals["kl"] / tokens,
        tokens=tokens,
    )
