"""What the dynamic cache knows about each row (padding, sinks, which tokens are decided), and
what its keys and values would occupy in packed storage."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from quantsink.errors import UserError
from quantsink.kv.scheme import KVCacheScheme

# Storage cost of what is kept in full precision, and of each outlier's position in its vector.
FP16_BYTES = 2
OUTLIER_INDEX_BYTES = 2


@dataclass(frozen=True)
class KVMemory:
    """What the cached keys and values would occupy in packed storage, in bytes, against the
    fp16 cache of the same tokens (`baseline`). `tokens` counts the real tokens of all rows
    (padding is free); the byte counts, and so `bytes_per_token`, cover all layers together."""

    tokens: int
    codes: int
    scales_and_offsets: int
    outliers: int
    full_precision: int
    baseline: int

    @property
    def total(self) -> int:
        return self.codes + self.scales_and_offsets + self.outliers + self.full_precision

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    @property
    def compression(self) -> float:
        return self.baseline / self.total if self.total else 1.0

    @classmethod
    def sum(cls, parts: Sequence["KVMemory"]) -> "KVMemory":
        """Field by field: the layers of one cache, or the caches of several batches."""
        return cls(**{name: sum(getattr(part, name) for part in parts) for name in cls.__dataclass_fields__})


EMPTY = KVMemory(0, 0, 0, 0, 0, 0)


def packed_memory(scheme: KVCacheScheme, heads: int, head_dim: int, keys: int, values: int, tokens: int) -> KVMemory:
    """One layer of `heads` x `head_dim` holding `tokens` real tokens, of which `keys` have their
    keys and `values` their values stored quantized."""
    vector = heads * head_dim
    token_groups = vector // min(scheme.group_size, head_dim)
    # outlier vectors (quantsink.kv.cache): a token's heads x head_dim entries, or one channel of a key group
    token_outliers = scheme.outliers_per_vector(vector)
    if scheme.keys.ranges == "calibrated":  # one range per channel of the layer, however many keys
        key_groups = vector if keys else 0
        key_outliers = keys * token_outliers
    elif scheme.keys.granularity == "per_channel":
        key_groups = keys // scheme.group_size * vector
        key_outliers = key_groups * scheme.outliers_per_vector(scheme.group_size)
    else:
        key_groups = keys * token_groups
        key_outliers = keys * token_outliers
    value_groups = values * token_groups
    outliers = key_outliers + values * token_outliers
    return KVMemory(
        tokens=tokens,
        codes=math.ceil((keys + values) * vector * scheme.bits / 8) if scheme.quantizes else 0,
        scales_and_offsets=(key_groups + value_groups) * 2 * FP16_BYTES,
        outliers=outliers * (FP16_BYTES + OUTLIER_INDEX_BYTES),
        full_precision=(2 * tokens - keys - values) * vector * FP16_BYTES,
        baseline=2 * tokens * vector * FP16_BYTES,
    )


class Rows:
    """What every layer needs to know about each row: which cached positions are padding and
    which are sinks. Shared by all layers of one cache."""

    def __init__(self, scheme: KVCacheScheme):
        self.scheme = scheme
        self.attention_mask: Optional[torch.Tensor] = None
        self.sink_positions: Optional[torch.Tensor] = None  # (batch, k), -1 where a row has fewer
        self.explicit_sinks = False  # set_sink_positions decided every position at once
        self.decided = 0  # streaming kvsink: the leading cache columns whose sink status is final
        # prefill: hold: the scores of the columns after `decided` that wait for the prompt's end
        self.held: Optional[torch.Tensor] = None  # (batch, waiting)

    @property
    def streams_sinks(self) -> bool:
        """kvsink fed by `offer_sinks`: tokens wait, unquantized, for their sink decision."""
        return self.scheme.sinks.method == "kvsink" and not self.explicit_sinks

    def decided_length(self, length: int) -> int:
        """How many leading columns of a `length`-column layer may be stored quantized."""
        return min(self.decided, length) if self.streams_sinks else length

    def check_batch(self, batch: int) -> None:
        for name, tensor in (("attention mask", self.attention_mask), ("sink positions", self.sink_positions)):
            if tensor is not None and tensor.shape[0] != batch:
                raise UserError(
                    f"the cache was given {name} for {tensor.shape[0]} rows but the model runs {batch}: "
                    "set them for the batch the model sees (beam search and num_return_sequences repeat each row)"
                )

    @property
    def waiting(self) -> int:
        """How many columns after `decided` a held prefill keeps exact until it ends."""
        return 0 if self.held is None else self.held.shape[1]

    def check_decided(self, cached: int) -> None:
        """A forward call must not start while an earlier one's tokens still wait for offer_sinks
        (the tokens a held prefill keeps waiting were offered)."""
        if self.streams_sinks and cached > self.decided + self.waiting:
            raise UserError(
                f"sinks.method 'kvsink': {cached - self.decided - self.waiting} cached tokens of an earlier forward call were never "
                "offered as sinks (no kvsink hook ran): build the cache with quantsink.kv_cache(model) for a model "
                "loaded with quantsink.load, or call set_sink_positions before prefill"
            )

    def real(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(batch, length) bool: not padding. Positions past the given mask are generated tokens."""
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
        if self.attention_mask is not None:
            known = min(length, self.attention_mask.shape[1])
            real[:, :known] = self.attention_mask[:, :known].to(device)
        return real

    def sinks(self, real: torch.Tensor) -> torch.Tensor:
        """(batch, length) bool: sink tokens under the scheme's sinks method."""
        method = self.scheme.sinks.method
        if method == "pfn":
            return real & (real.cumsum(-1) <= self.scheme.sinks.num_sinks)
        sinks = torch.zeros_like(real)
        if method == "kvsink" and self.sink_positions is not None:
            positions = self.sink_positions.to(real.device)
            inside = (positions >= 0) & (positions < real.shape[1])
            rows = torch.arange(real.shape[0], device=real.device).unsqueeze(1).expand_as(positions)
            sinks[rows[inside], positions[inside]] = True
        return sinks & real

    def take(self, index: torch.Tensor) -> None:
        for name in ("attention_mask", "sink_positions", "held"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[index.to(tensor.device)])

    def repeat_interleave(self, repeats: int) -> None:
        for name in ("attention_mask", "sink_positions", "held"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))
