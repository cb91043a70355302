"""SinkQuantizedCache: a transformers KV cache that quantizes keys and values the KIVI / KVQuant
way while keeping attention-sink tokens in full precision (KVSink, arXiv 2508.04257).

    from quantsink.kvcache import KVQuantConfig, SinkQuantizedCache
    cache = SinkQuantizedCache(KVQuantConfig(bits=2, sink_strategy="kvsink", num_sinks=5))
    cache.set_attention_mask(inputs["attention_mask"])   # left padding: never in any range
    cache.set_sink_positions(positions)                  # kvsink: per row, before prefill
    model.generate(**inputs, past_key_values=cache)

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
  padding; StreamingLLM, KVQuant's first-token fp16); `kvsink` keeps the positions handed in
  per row by `set_sink_positions` (found at prefill by the profiler: top-k of |h| in the stable
  outlier channel at the emergence layer).
* Tokens a forward call adds are returned to attention in full precision (the current chunk
  attends to itself exactly, as in KIVI's prefill); earlier tokens are read back as stored.

`bits=16` stores nothing quantized and returns exactly what transformers' `DynamicCache` does.
Memory is accounted for by `SinkQuantizedCache.memory()` as packed storage would cost it, with
fp16 for every full-precision value, scale and offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Annotated, Callable, Literal, NamedTuple, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from quantsink.errors import UserError
from quantsink.quantizers.functional import fake_quantize, qparams_from_range

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


class _Rows:
    """What every layer needs to know about each row: which cached positions are padding and
    which are sinks. Shared by all layers of one cache."""

    def __init__(self, config: KVQuantConfig):
        self.config = config
        self.attention_mask: Optional[torch.Tensor] = None
        self.sink_positions: Optional[torch.Tensor] = None  # (batch, k), -1 where a row has fewer

    def check_batch(self, batch: int) -> None:
        for name, tensor in (("attention mask", self.attention_mask), ("sink positions", self.sink_positions)):
            if tensor is not None and tensor.shape[0] != batch:
                raise UserError(
                    f"the cache was given {name} for {tensor.shape[0]} rows but the model runs {batch}: "
                    "set them for the batch the model sees (beam search and num_return_sequences repeat each row)"
                )
        if self.config.sink_strategy == "kvsink" and self.sink_positions is None:
            raise UserError(
                "sink_strategy 'kvsink' needs the sink positions of every row before prefill: "
                "call cache.set_sink_positions(...) first, or use sink_strategy 'pfn'"
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
        if self.config.sink_strategy == "kvsink":
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
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._store(keys, values) if self.config.quantizes else (keys, values)
        return keys, values

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the stream tokens that left the residual window since the last call."""
        config = self.config
        batch, _, length, head_dim = keys.shape
        real = self.rows.real(batch, length, keys.device)
        stream = real & ~self.rows.sinks(real)
        real_index = real.cumsum(-1) - 1
        leaving = stream & (real_index < real.sum(-1, keepdim=True) - config.residual_length)
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
    """A transformers `Cache` for `generate(past_key_values=cache)` and plain forward calls.

    Call `set_attention_mask` with the prompt's mask when rows are padded, and, for the `kvsink`
    strategy, `set_sink_positions` before prefill. `rotary_embedding` (the model's rotary
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

    def memory(self) -> KVMemory:
        """Packed-storage accounting over all layers (see `KVMemory`)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return KVMemory(0, 0, 0, 0, 0, 0)
        batch, length = layers[0].keys.shape[0], layers[0].keys.shape[-2]
        real_tokens = self.rows.real(batch, length, layers[0].keys.device).sum(-1)
        parts = [layer.memory(real_tokens) for layer in layers]
        totals = {name: sum(getattr(part, name) for part in parts) for name in KVMemory.__dataclass_fields__}
        return KVMemory(**{**totals, "tokens": int(real_tokens.sum())})

    def bytes_per_token(self) -> float:
        """Packed-storage bytes per cached token, all layers together."""
        return self.memory().bytes_per_token

    def reset(self) -> None:
        """Empty every layer and forget the attention mask and sink positions."""
        super().reset()
        self.rows.attention_mask = self.rows.sink_positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.rows.take(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows.take(indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows.repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)


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
    if chunk_size < 1:
        raise UserError(f"chunk_size must be positive, got {chunk_size}")
    if cache.get_seq_length() > 0:
        raise UserError("chunked_log_likelihood needs an empty cache: pass a new one or call cache.reset()")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if isinstance(cache, SinkQuantizedCache):
        cache.set_attention_mask(attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    picked = []
    for start in range(0, input_ids.shape[1], chunk_size):
        end = start + chunk_size
        logits = model(
            input_ids=input_ids[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end],
            past_key_values=cache,
            use_cache=True,
        ).logits
        targets = input_ids[:, start + 1 : end + 1]  # the last position has nothing to predict
        log_probs = torch.log_softmax(logits[:, : targets.shape[1]].float(), dim=-1)
        picked.append(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    real = attention_mask.bool()
    return torch.cat(picked, dim=1).masked_fill(~(real[:, 1:] & real[:, :-1]), 0.0)
