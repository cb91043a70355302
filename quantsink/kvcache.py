"""SinkQuantizedCache: a transformers KV cache that quantizes keys and values the KIVI / KVQuant
way while keeping attention-sink tokens in full precision (KVSink, arXiv 2508.04257).

    from quantsink.kvcache import KVQuantConfig, SinkQuantizedCache
    cache = SinkQuantizedCache(KVQuantConfig(bits=2, sink_strategy="kvsink", num_sinks=5))
    cache.set_attention_mask(inputs["attention_mask"])   # left padding: never in any range
    model.generate(**inputs, past_key_values=cache)      # kvsink: a hook calls cache.offer_sinks (transformers >= 5.24: cache=)

Scheme (every choice below is what the numbers of real packed storage would be; the cache keeps
the dequantized values so that attention reads exactly what packed storage would give back):

* Stream. Per row, the tokens that get quantized are the row's real tokens (not padding) that
  are not sinks, in order. Sinks and padding never enter a group, so no scale or offset ever
  sees them: sinks are stored in full precision in every layer, padding costs nothing.
* Residual window (KIVI). The last `residual_length` real tokens of a row stay in full
  precision; a stream token is quantized when it leaves the window, and never re-quantized.
* Values: per token, in groups of `group_size` consecutive channels of one head.
* Keys, `per_channel` (KIVI, and KVQuant's per-channel keys computed online): one scale per
  channel of each head over a group of `group_size` consecutive stream tokens; a group is
  quantized once it is complete and all its tokens have left the residual window, so up to
  `group_size - 1` more keys than values can wait in full precision. `per_token`: like values.
* Arithmetic: asymmetric min-max per group (KIVI): codes q = clamp(round((x - min) / scale),
  0, 2^b - 1) with scale = (max - min) / (2^b - 1), read back as q * scale + min; the codes are
  those of `quantizers.functional.quantize` applied to x - min. Each group stores b-bit codes,
  a scale and an offset (its minimum).
* Dense-and-sparse outliers (KVQuant): in every group the ceil(outlier_fraction * group size)
  largest-magnitude values are kept exact and left out of the group's min and max.
* Pre-RoPE keys (KVQuant): the cache un-rotates keys with the model's rotary embedding,
  quantizes them, and rotates the read-back again. Positions are each row's real-token index
  (what `generate` uses with left padding); a plain forward with other position ids still gets
  a valid quantization, only in a different rotated frame.
* Sinks: `none`; `pfn` keeps the first `num_sinks` real tokens of each row (after any left
  padding; StreamingLLM, KVQuant's first-token fp16); `kvsink` keeps predicted tokens, decided
  in one of two ways:
  - streaming (`offer_sinks`): a hook on the emergence layer l_E (quantsink.methods.kvsink)
    scores every token of each forward call, and each row keeps the best-scoring offered tokens
    while it has fewer than `num_sinks` sinks, so a prompt prefilled at once gets its top-k and
    a later massive token (a generated ".") still becomes a sink while budget is left. An offered
    token is decided for good. A token is never quantized before it is decided: the layers
    updated before the hook (blocks <= l_E) keep the forward's tokens in full precision until
    `offer_sinks` stores them, layers after l_E store them at their own update;
  - explicit (`set_sink_positions`, before prefill): every position is decided at once, and
    offered scores are ignored.
* Tokens a forward call adds are returned to attention in full precision (the current chunk
  attends to itself exactly, as in KIVI's prefill); earlier tokens are read back as stored.

`bits=16` stores nothing quantized and returns exactly what transformers' `DynamicCache` does.
Memory is accounted for by `SinkQuantizedCache.memory()` as packed storage would cost it, with
fp16 for every full-precision value, scale and offset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Annotated, Callable, Literal, NamedTuple, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from quantsink.errors import UserError
from quantsink.models.base import Adapter
from quantsink.models.causal_lm import cache_in_call
from quantsink.quantizers.functional import fake_quantize, qparams_from_range
from quantsink.registry import KV_CACHE_BACKENDS

if TYPE_CHECKING:
    from quantsink.recipe import KVCacheConfig

# Storage cost of what is kept in full precision, and of each outlier's position in its group.
FP16_BYTES = 2
OUTLIER_INDEX_BYTES = 2

RotaryEmbedding = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KeyGranularity(str, Enum):
    per_channel = "per_channel"
    per_token = "per_token"


class SinkStrategy(str, Enum):
    none = "none"
    pfn = "pfn"
    kvsink = "kvsink"


class KVQuantConfig(BaseModel):
    """How `SinkQuantizedCache` quantizes; see the module docstring for the exact scheme."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_default=True, frozen=True)

    bits: Literal[2, 3, 4, 8, 16] = 4
    key_granularity: KeyGranularity = KeyGranularity.per_channel
    group_size: Annotated[int, Field(ge=1)] = 32
    residual_length: Annotated[int, Field(ge=0)] = 128
    outlier_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    pre_rope: bool = False
    sink_strategy: SinkStrategy = SinkStrategy.none
    num_sinks: Annotated[int, Field(ge=0)] = 5

    @model_validator(mode="after")
    def _sinks_need_a_count(self) -> "KVQuantConfig":
        if self.sink_strategy != "none" and self.num_sinks == 0:
            raise ValueError(f"sink_strategy {self.sink_strategy!r} keeps num_sinks tokens per row: set num_sinks >= 1")
        return self

    @property
    def quantizes(self) -> bool:
        return self.bits < 16

    def outliers_per_group(self, group_numel: int) -> int:
        return math.ceil(self.outlier_fraction * group_numel)


class GroupQuantization(NamedTuple):
    """`values`: what packed storage reads back; `scale`, `offset`: one per group (last dim
    reduced, kept as size 1); `outliers`: where `values` holds the exact input."""

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    outliers: torch.Tensor


def quantize_groups(x: torch.Tensor, bits: int, outliers_per_group: int = 0) -> GroupQuantization:
    """Asymmetric min-max quantization of every group along the last dimension of `x`, with the
    `outliers_per_group` largest-magnitude values of each group kept exact and out of its range."""
    work = x.float()
    outliers = torch.zeros_like(work, dtype=torch.bool)
    if outliers_per_group:
        outliers.scatter_(-1, work.abs().topk(outliers_per_group, dim=-1).indices, True)
    low = work.masked_fill(outliers, math.inf).amin(dim=-1, keepdim=True)
    high = work.masked_fill(outliers, -math.inf).amax(dim=-1, keepdim=True)
    scale, zero_point = qparams_from_range(torch.zeros_like(low), high - low, bits, symmetric=False)
    dequantized = fake_quantize(work - low, scale, zero_point, bits, symmetric=False) + low
    values = torch.where(outliers, work, dequantized).to(x.dtype)
    return GroupQuantization(values, scale, low, outliers)


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


class _Rows:
    """What every layer needs to know about each row: which cached positions are padding and
    which are sinks. Shared by all layers of one cache."""

    def __init__(self, config: KVQuantConfig):
        self.config = config
        self.attention_mask: Optional[torch.Tensor] = None
        self.sink_positions: Optional[torch.Tensor] = None  # (batch, k), -1 where a row has fewer
        self.explicit_sinks = False  # set_sink_positions decided every position at once
        self.decided = 0  # streaming kvsink: the leading cache columns whose sink status is final

    @property
    def streams_sinks(self) -> bool:
        """kvsink fed by `offer_sinks`: tokens wait, unquantized, for their sink decision."""
        return self.config.sink_strategy == "kvsink" and not self.explicit_sinks

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

    def check_decided(self, cached: int) -> None:
        """A forward call must not start while an earlier one's tokens still wait for offer_sinks."""
        if self.streams_sinks and cached > self.decided:
            raise UserError(
                f"sink_strategy 'kvsink': {cached - self.decided} cached tokens of an earlier forward call were never "
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
        """(batch, length) bool: sink tokens under the configured strategy."""
        if self.config.sink_strategy == "pfn":
            return real & (real.cumsum(-1) <= self.config.num_sinks)
        sinks = torch.zeros_like(real)
        if self.config.sink_strategy == "kvsink" and self.sink_positions is not None:
            positions = self.sink_positions.to(real.device)
            inside = (positions >= 0) & (positions < real.shape[1])
            rows = torch.arange(real.shape[0], device=real.device).unsqueeze(1).expand_as(positions)
            sinks[rows[inside], positions[inside]] = True
        return sinks & real

    def take(self, index: torch.Tensor) -> None:
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[index.to(self.attention_mask.device)]
        if self.sink_positions is not None:
            self.sink_positions = self.sink_positions[index.to(self.sink_positions.device)]

    def repeat_interleave(self, repeats: int) -> None:
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.repeat_interleave(repeats, dim=0)
        if self.sink_positions is not None:
            self.sink_positions = self.sink_positions.repeat_interleave(repeats, dim=0)


class SinkQuantizedLayer(DynamicLayer):
    """One layer of `SinkQuantizedCache`. `keys` / `values` hold what attention reads back:
    dequantized where stored quantized, exact elsewhere."""

    is_croppable = False

    def __init__(self, config: KVQuantConfig, rows: _Rows, rotary_embedding: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.config = config
        self.rows = rows
        self.rotary_embedding = rotary_embedding
        # Per row, how many stream tokens have their keys / values stored quantized.
        self.quantized_keys: Optional[torch.Tensor] = None
        self.quantized_values: Optional[torch.Tensor] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.rows.check_batch(key_states.shape[0])
            counts = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
            self.quantized_keys, self.quantized_values = counts, counts.clone()
        self.rows.check_decided(self.get_seq_length())
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._store(keys, values) if self.config.quantizes else (keys, values)
        return keys, values

    def store_decided(self) -> None:
        """Quantize what became storable when `offer_sinks` decided this layer's newest tokens.
        `_store` clones before writing, so the states attention already got stay exact."""
        if self.is_initialized and self.config.quantizes:
            self.keys, self.values = self._store(self.keys, self.values)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the stream tokens that left the residual window since the last call."""
        config = self.config
        batch, _, length, head_dim = keys.shape
        real = self.rows.real(batch, length, keys.device)
        stream = real & ~self.rows.sinks(real)
        real_index = real.cumsum(-1) - 1
        leaving = stream & (real_index < real.sum(-1, keepdim=True) - config.residual_length)
        # undecided tokens are the newest columns, so what leaves stays a prefix of each row's stream
        leaving[:, self.rows.decided_length(length) :] = False
        stream_index = stream.cumsum(-1) - 1
        done = leaving.sum(-1)
        group = min(config.group_size, head_dim)
        if head_dim % group:
            raise UserError(f"group_size {config.group_size} does not divide head_dim {head_dim}: pick a divisor of {head_dim}")

        def newly(already: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
            return stream & (stream_index >= already.unsqueeze(-1)) & (stream_index < upto.unsqueeze(-1))

        values = _requantize(values, newly(self.quantized_values, done), partial(self._per_token, group=group))
        self.quantized_values = done
        key_done = done - done % config.group_size if config.key_granularity == "per_channel" else done
        key_quantizer = self._per_channel if config.key_granularity == "per_channel" else partial(self._per_token, group=group)
        select = newly(self.quantized_keys, key_done)
        if config.pre_rope:
            key_quantizer = partial(self._pre_rope, key_quantizer, positions=real_index[select])
        keys = _requantize(keys, select, key_quantizer)
        self.quantized_keys = key_done
        return keys, values

    def _per_token(self, picked: torch.Tensor, group: int) -> torch.Tensor:
        """picked: (tokens, heads, head_dim) -> groups of `group` channels of one token."""
        grouped = picked.reshape(*picked.shape[:-1], -1, group)
        outliers = self.config.outliers_per_group(group)
        return quantize_groups(grouped, self.config.bits, outliers).values.reshape(picked.shape)

    def _per_channel(self, picked: torch.Tensor) -> torch.Tensor:
        """picked: (tokens, heads, head_dim), each row's tokens consecutive and a whole number of
        groups -> per channel over `group_size` consecutive tokens."""
        size = self.config.group_size
        grouped = picked.reshape(-1, size, *picked.shape[1:]).movedim(1, -1)
        outliers = self.config.outliers_per_group(size)
        return quantize_groups(grouped, self.config.bits, outliers).values.movedim(-1, 1).reshape(picked.shape)

    def _pre_rope(self, quantizer, picked: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Quantize the un-rotated keys (at real-token `positions`), then rotate the read-back."""
        cos, sin = self.rotary_embedding(picked, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1).to(picked.dtype), sin[0].unsqueeze(1).to(picked.dtype)
        rotary_dim = cos.shape[-1]
        rotated, passed = picked[..., :rotary_dim], picked[..., rotary_dim:]
        unrotated = torch.cat([rotated * cos - rotate_half(rotated) * sin, passed], dim=-1)
        read_back = quantizer(unrotated)
        rotated, passed = read_back[..., :rotary_dim], read_back[..., rotary_dim:]
        return torch.cat([rotated * cos + rotate_half(rotated) * sin, passed], dim=-1)

    # --- batch bookkeeping ----------------------------------------------------------------
    def take_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys[index.to(self.keys.device)]
        self.values = self.values[index.to(self.values.device)]
        self.quantized_keys = self.quantized_keys[index.to(self.quantized_keys.device)]
        self.quantized_values = self.quantized_values[index.to(self.quantized_values.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.take_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.take_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.take_rows(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SinkQuantizedCache cannot crop: quantized tokens cannot be restored (assisted generation "
            "and rollbacks need a DynamicCache)"
        )

    def reset(self) -> None:
        super().reset()
        self.quantized_keys = self.quantized_values = None

    # --- accounting -----------------------------------------------------------------------
    def memory(self, real_tokens: torch.Tensor) -> KVMemory:
        """Packed-storage bytes of this layer, given each row's number of real tokens."""
        if not self.is_initialized or self.keys.numel() == 0:
            return KVMemory(0, 0, 0, 0, 0, 0)
        config = self.config
        heads, head_dim = self.keys.shape[1], self.keys.shape[-1]
        group = min(config.group_size, head_dim)
        keys, values, tokens = (int(t.sum()) for t in (self.quantized_keys, self.quantized_values, real_tokens))
        token_groups = heads * head_dim // group
        if config.key_granularity == "per_channel":
            key_groups = keys // config.group_size * heads * head_dim
        else:
            key_groups = keys * token_groups
        value_groups = values * token_groups
        key_group_size = config.group_size if config.key_granularity == "per_channel" else group
        outliers = key_groups * config.outliers_per_group(key_group_size) + value_groups * config.outliers_per_group(group)
        vector = heads * head_dim
        return KVMemory(
            tokens=tokens,
            codes=math.ceil((keys + values) * vector * config.bits / 8) if config.quantizes else 0,
            scales_and_offsets=(key_groups + value_groups) * 2 * FP16_BYTES,
            outliers=outliers * (FP16_BYTES + OUTLIER_INDEX_BYTES),
            full_precision=(2 * tokens - keys - values) * vector * FP16_BYTES,
            baseline=2 * tokens * vector * FP16_BYTES,
        )


def _requantize(states: torch.Tensor, select: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`states` (batch, heads, length, head_dim) with the tokens chosen by `select` (batch,
    length) replaced by `quantizer`'s read-back; `quantizer` gets them as (tokens, heads,
    head_dim) in row-major order, so each row's tokens are consecutive and in order."""
    if not bool(select.any()):
        return states
    stored = states.clone()
    by_token = stored.transpose(1, 2)
    by_token[select] = quantizer(by_token[select])
    return stored


class SinkQuantizedCache(Cache):
    """A transformers `Cache` for `generate(past_key_values=cache)` (`cache=cache` from
    transformers 5.24) and plain forward calls.

    Call `set_attention_mask` with the prompt's mask when rows are padded. The `kvsink` strategy
    needs its sinks from a hook that calls `offer_sinks` in every forward call (what
    `quantsink.kv_cache(model)` gets for a model from `quantsink.load`), or from
    `set_sink_positions` before prefill. `rotary_embedding` (the model's rotary
    module, called as `rotary_embedding(x, position_ids) -> (cos, sin)`) is needed for
    `pre_rope` only. One cache serves one batch of sequences; `reset` empties it for reuse.
    """

    def __init__(self, config: Optional[KVQuantConfig] = None, rotary_embedding: Optional[RotaryEmbedding | nn.Module] = None):
        self.config = config if config is not None else KVQuantConfig()
        if self.config.pre_rope and self.config.quantizes and rotary_embedding is None:
            raise UserError(
                "pre_rope quantization needs the model's rotary embedding: "
                "SinkQuantizedCache(config, rotary_embedding=model.model.rotary_emb)"
            )
        self.rows = _Rows(self.config)
        super().__init__(layer_class_to_replicate=partial(SinkQuantizedLayer, self.config, self.rows, rotary_embedding))

    def set_attention_mask(self, attention_mask: torch.Tensor) -> None:
        """(batch, length) mask of the tokens about to be cached, 1 for real tokens and 0 for
        padding (any position; left padding for generation). Tokens past its length count as real."""
        if attention_mask.dim() != 2:
            raise UserError(f"set_attention_mask takes the 2-D (batch, length) mask, got shape {tuple(attention_mask.shape)}")
        self.rows.attention_mask = attention_mask.bool()

    def set_sink_positions(self, positions: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Cache positions (columns of the input ids, padding included) of each row's sinks,
        as a (batch, k) tensor or one list per row; -1 pads rows with fewer. At most
        `num_sinks` per row."""
        if self.get_seq_length() > 0:
            raise UserError("set_sink_positions must come before prefill: call cache.reset() first to reuse this cache")
        if not isinstance(positions, torch.Tensor):
            width = max((len(row) for row in positions), default=0)
            positions = torch.tensor([list(row) + [-1] * (width - len(row)) for row in positions], dtype=torch.long)
        positions = positions.long()
        if positions.dim() != 2:
            raise UserError(f"sink positions must be (batch, k), got shape {tuple(positions.shape)}")
        if positions.shape[1] > self.config.num_sinks and bool(((positions >= 0).sum(-1) > self.config.num_sinks).any()):
            raise UserError(
                f"a row has more than num_sinks={self.config.num_sinks} sink positions: raise num_sinks or pass fewer"
            )
        if bool((positions < -1).any()):
            raise UserError("sink positions are column indices >= 0 (-1 pads shorter rows)")
        self.rows.sink_positions = positions
        self.rows.explicit_sinks = True

    def offer_sinks(self, scores: torch.Tensor) -> None:
        """Decide the sink status of the tokens this forward call cached so far, for the `kvsink`
        strategy: `scores` (batch, new) ranks the last `new` cached columns, -inf (or NaN) for
        "never a sink"; padding never is one. Each row keeps the best-scoring offered tokens while
        it has fewer than `num_sinks` sinks (ties: the earlier token), and every offered token is
        decided for good: the layers already updated in this call store now what may be stored.
        Called by the kvsink hook on the emergence layer, so `new` is the whole call's tokens and
        layer 0's length says where they are. Ignored for other strategies and after
        `set_sink_positions`."""
        if not self.rows.streams_sinks:
            return
        if scores.dim() != 2:
            raise UserError(f"offer_sinks takes (batch, new) scores, got shape {tuple(scores.shape)}")
        length = self.get_seq_length()
        batch, new = scores.shape
        if new != length - self.rows.decided:
            raise UserError(
                f"offer_sinks got scores for {new} tokens but {length - self.rows.decided} cached tokens wait for a "
                "decision: score every token of the forward call, once, after its block updated the cache"
            )
        self.rows.check_batch(batch)
        device = scores.device
        if self.rows.sink_positions is None:
            self.rows.sink_positions = torch.full((batch, self.config.num_sinks), -1, dtype=torch.long, device=device)
        positions = self.rows.sink_positions
        kept = (positions >= 0).sum(-1, keepdim=True).to(device)
        eligible = self.rows.real(batch, length, device)[:, length - new :] & (scores.float() > -math.inf)
        order = scores.float().masked_fill(~eligible, -math.inf).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(new, device=device).expand(batch, new))
        chosen = eligible & (rank < self.config.num_sinks - kept)
        # new sinks fill each row's free slots, in column order after the sinks it already has
        slot = kept + chosen.cumsum(-1) - 1
        rows, columns = chosen.nonzero(as_tuple=True)
        at = positions.device
        positions[rows.to(at), slot[rows, columns].to(at)] = (columns + length - new).to(at)
        self.rows.decided = length
        for layer in self.layers:
            if layer.get_seq_length() == length:
                layer.store_decided()

    def memory(self) -> KVMemory:
        """Packed-storage accounting over all layers (see `KVMemory`)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return KVMemory(0, 0, 0, 0, 0, 0)
        batch, length = layers[0].keys.shape[0], layers[0].keys.shape[-2]
        real_tokens = self.rows.real(batch, length, layers[0].keys.device).sum(-1)
        # every layer holds the same tokens: they count once
        total = KVMemory.sum([layer.memory(real_tokens) for layer in layers])
        return dataclasses.replace(total, tokens=int(real_tokens.sum()))

    def bytes_per_token(self) -> float:
        """Packed-storage bytes per cached token, all layers together."""
        return self.memory().bytes_per_token

    def reset(self) -> None:
        """Empty every layer and forget the attention mask and sink positions."""
        super().reset()
        self.rows.attention_mask = self.rows.sink_positions = None
        self.rows.explicit_sinks, self.rows.decided = False, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.rows.take(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows.take(indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows.repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)



# --- what a recipe's kv_cache section builds ----------------------------------------------
# A loaded or freshly quantized model carries its recipe's kv_cache section here (a plain
# attribute: never in the state_dict), so `quantsink.kv_cache(model)` can build its cache.
KV_CACHE_ATTRIBUTE = "quantsink_kv_cache"
MASK_HOOK_ATTRIBUTE = "quantsink_kv_mask_hook"


class KVCacheBackend:
    """A KV-cache implementation a recipe names in `kv_cache.backend`: which bit widths and
    options it supports, and how it builds an empty cache for a model."""

    bits: tuple[int, ...]

    def incompatibility(self, config: "KVCacheConfig") -> Optional[str]:
        """Why this backend cannot run `config` (one line with the fix), or None."""
        if config.bits not in self.bits:
            supported = ", ".join(str(bits) for bits in self.bits)
            return f"bits {config.bits}: the {self.name} KV cache stores {supported} bits; pick one of those"
        return None

    @property
    def name(self) -> str:
        return next(name for name, backend in KV_CACHE_BACKENDS.items() if backend is self)

    def build(self, config: "KVCacheConfig", adapter: Adapter) -> Cache:
        raise NotImplementedError


class QuantsinkKVCacheBackend(KVCacheBackend):
    """`SinkQuantizedCache`: every option of the kv_cache section, sinks included."""

    bits = (2, 3, 4, 8, 16)

    @staticmethod
    def quant_config(config: "KVCacheConfig") -> KVQuantConfig:
        return KVQuantConfig(
            bits=config.bits,
            key_granularity=config.keys.granularity,
            group_size=config.group_size,
            residual_length=config.residual_length,
            outlier_fraction=config.outlier_fraction,
            pre_rope=config.keys.pre_rope,
            sink_strategy=config.sinks.method,
            num_sinks=config.sinks.num_sinks,
        )

    def build(self, config: "KVCacheConfig", adapter: Adapter) -> Cache:
        quant_config = self.quant_config(config)
        rotary = adapter.rotary_embedding() if quant_config.pre_rope else None
        return SinkQuantizedCache(quant_config, rotary_embedding=rotary)


class TransformersQuantoKVCacheBackend(KVCacheBackend):
    """transformers' own `QuantizedCache` with optimum-quanto (the baseline quantsink's cache is
    measured against): 2 or 4 bits, per-token keys and values in groups of `group_size` channels,
    no sinks, no pre-RoPE keys, no outliers. It quantizes the
    whole prompt at the first update and re-quantizes everything whenever its residual buffer
    fills, so its error compounds where SinkQuantizedCache quantizes each token once."""

    bits = (2, 4)

    def incompatibility(self, config: "KVCacheConfig") -> Optional[str]:
        unsupported = [
            (config.sinks.method != "none", f"sinks.method {config.sinks.method}"),
            (config.keys.pre_rope, "keys.pre_rope"),
            (config.outlier_fraction > 0, "outlier_fraction"),
            # its per-channel axis groups across batch, heads and tokens and fails unless they divide the group
            (config.keys.granularity == "per_channel", "usable keys.granularity per_channel (set per_token)"),
        ]
        for present, what in unsupported:
            if present:
                return f"backend {self.name} has no {what}: use backend quantsink"
        return super().incompatibility(config)

    def build(self, config: "KVCacheConfig", adapter: Adapter) -> Cache:
        from transformers import QuantizedCache

        return QuantizedCache(
            backend="quanto",
            config=adapter.model.config,
            nbits=config.bits,
            axis_key=0,
            axis_value=0,
            q_group_size=config.group_size,
            residual_length=config.residual_length,
        )


KV_CACHE_BACKENDS.register("quantsink")(QuantsinkKVCacheBackend())
KV_CACHE_BACKENDS.register("transformers-quanto")(TransformersQuantoKVCacheBackend())


def build_kv_cache(config: "KVCacheConfig", adapter: Adapter) -> Cache:
    require_kv_cache(adapter)
    return KV_CACHE_BACKENDS.get(config.backend).build(config, adapter)


def require_kv_cache(
    adapter: Adapter, asker: str = "a kv_cache recipe", fix: str = "give it a causal LM, or use a recipe without kv_cache"
) -> None:
    """Refuse a model without a KV cache for what `asker` does to one, saying `fix`."""
    if not adapter.has_kv_cache:
        raise UserError(f"{asker} quantizes a causal LM's KV cache; {adapter.source.spec} ({adapter.family}) has none: {fix}")


def describe_kv_cache(config: "KVCacheConfig") -> str:
    sinks = config.sinks.method if config.sinks.method == "none" else f"{config.sinks.method}-{config.sinks.num_sinks}"
    keys = f"keys {config.keys.granularity}{' pre-RoPE' if config.keys.pre_rope else ''}"
    outliers = f", {config.outlier_fraction:.1%} outliers" if config.outlier_fraction else ""
    return (
        f"{config.backend} {config.bits}-bit, {keys}, values per_token, groups of {config.group_size}, "
        f"residual {config.residual_length}{outliers}, sinks {sinks}"
    )


def attach_kv_cache_config(model: nn.Module, config: "KVCacheConfig") -> None:
    """Give `model` its recipe's kv_cache section, and have every forward call hand its 2-D
    attention mask to the SinkQuantizedCache it runs with, so that left-padded batches need no
    `set_attention_mask` in `generate`."""
    setattr(model, KV_CACHE_ATTRIBUTE, config)
    if MASK_HOOK_ATTRIBUTE not in model.__dict__:
        setattr(model, MASK_HOOK_ATTRIBUTE, model.register_forward_pre_hook(_hand_over_attention_mask, with_kwargs=True))


def _hand_over_attention_mask(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
    cache, mask = cache_in_call(kwargs), kwargs.get("attention_mask")
    if isinstance(cache, SinkQuantizedCache) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        cache.set_attention_mask(mask)


def kv_cache_config_of(model: nn.Module) -> "KVCacheConfig":
    config = model.__dict__.get(KV_CACHE_ATTRIBUTE)
    if config is None:
        raise UserError(
            "this model carries no kv_cache recipe: load it with quantsink.load(OUT) from a folder quantized "
            "with a kv_cache section (or pass the QuantizationResult of such a recipe)"
        )
    return config
