"""SinkQuantizedCache: a transformers KV cache that quantizes keys and values the KIVI / KVQuant
way while keeping attention-sink tokens in full precision (KVSink, arXiv 2508.04257).

    from quantsink.kv.cache import SinkQuantizedCache
    from quantsink.kv.scheme import KVCacheScheme
    cache = SinkQuantizedCache(KVCacheScheme(bits=2, sinks={"method": "kvsink", "num_sinks": 5}))
    cache.set_attention_mask(inputs["attention_mask"])   # left padding: never in any range
    model.generate(**inputs, past_key_values=cache)      # kvsink: a hook calls cache.offer_sinks (transformers >= 5.24: cache=)

How it quantizes a `scales: dynamic` scheme (quantsink.kv.scheme; every choice below is what the numbers of real packed storage would be; the cache keeps
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
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quantsink.errors import UserError
from quantsink.kv.arithmetic import quantize_groups, requantize, rotate
from quantsink.kv.scheme import KVCacheScheme
from quantsink.kv.storage import EMPTY, KVMemory, Rows, packed_memory

RotaryEmbedding = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SinkQuantizedLayer(DynamicLayer):
    """One layer of `SinkQuantizedCache`. `keys` / `values` hold what attention reads back:
    dequantized where stored quantized, exact elsewhere."""

    is_croppable = False

    def __init__(self, scheme: KVCacheScheme, rows: Rows, rotary_embedding: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.scheme = scheme
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
        self.keys, self.values = self._store(keys, values) if self.scheme.quantizes else (keys, values)
        return keys, values

    def store_decided(self) -> None:
        """Quantize what became storable when `offer_sinks` decided this layer's newest tokens.
        `_store` clones before writing, so the states attention already got stay exact."""
        if self.is_initialized and self.scheme.quantizes:
            self.keys, self.values = self._store(self.keys, self.values)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the stream tokens that left the residual window since the last call."""
        scheme = self.scheme
        batch, _, length, head_dim = keys.shape
        real = self.rows.real(batch, length, keys.device)
        stream = real & ~self.rows.sinks(real)
        real_index = real.cumsum(-1) - 1
        leaving = stream & (real_index < real.sum(-1, keepdim=True) - scheme.residual_length)
        # undecided tokens are the newest columns, so what leaves stays a prefix of each row's stream
        leaving[:, self.rows.decided_length(length) :] = False
        stream_index = stream.cumsum(-1) - 1
        done = leaving.sum(-1)
        group = min(scheme.group_size, head_dim)
        if head_dim % group:
            raise UserError(f"group_size {scheme.group_size} does not divide head_dim {head_dim}: pick a divisor of {head_dim}")

        def newly(already: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
            return stream & (stream_index >= already.unsqueeze(-1)) & (stream_index < upto.unsqueeze(-1))

        values = requantize(values, newly(self.quantized_values, done), partial(self._per_token, group=group))
        self.quantized_values = done
        per_channel = scheme.keys.granularity == "per_channel"
        key_done = done - done % scheme.group_size if per_channel else done
        key_quantizer = self._per_channel if per_channel else partial(self._per_token, group=group)
        select = newly(self.quantized_keys, key_done)
        if scheme.keys.pre_rope:
            key_quantizer = partial(self._pre_rope, key_quantizer, positions=real_index[select])
        keys = requantize(keys, select, key_quantizer)
        self.quantized_keys = key_done
        return keys, values

    def _per_token(self, picked: torch.Tensor, group: int) -> torch.Tensor:
        """picked: (tokens, heads, head_dim) -> groups of `group` channels of one token."""
        grouped = picked.reshape(*picked.shape[:-1], -1, group)
        outliers = self.scheme.outliers_per_group(group)
        return quantize_groups(grouped, self.scheme.bits, outliers).values.reshape(picked.shape)

    def _per_channel(self, picked: torch.Tensor) -> torch.Tensor:
        """picked: (tokens, heads, head_dim), each row's tokens consecutive and a whole number of
        groups -> per channel over `group_size` consecutive tokens."""
        size = self.scheme.group_size
        grouped = picked.reshape(-1, size, *picked.shape[1:]).movedim(1, -1)
        outliers = self.scheme.outliers_per_group(size)
        return quantize_groups(grouped, self.scheme.bits, outliers).values.movedim(-1, 1).reshape(picked.shape)

    def _pre_rope(self, quantizer, picked: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Quantize the un-rotated keys (at real-token `positions`), then rotate the read-back."""
        cos, sin = self.rotary_embedding(picked, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1).to(picked.dtype), sin[0].unsqueeze(1).to(picked.dtype)
        return rotate(quantizer(rotate(picked, cos, sin, inverse=True)), cos, sin)

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
            return EMPTY
        keys, values, tokens = (int(t.sum()) for t in (self.quantized_keys, self.quantized_values, real_tokens))
        return packed_memory(self.scheme, self.keys.shape[1], self.keys.shape[-1], keys, values, tokens)


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

    def __init__(self, scheme: Optional[KVCacheScheme] = None, rotary_embedding: Optional[RotaryEmbedding | nn.Module] = None):
        self.scheme = scheme if scheme is not None else KVCacheScheme()
        if self.scheme.scales != "dynamic":
            raise UserError(
                "SinkQuantizedCache computes dynamic scales; a scheme with scales: static quantizes in the attentions "
                "(quantsink.kv_cache(model) of a model quantized with it gives a plain DynamicCache): set scales: dynamic"
            )
        if self.scheme.keys.pre_rope and self.scheme.quantizes and rotary_embedding is None:
            raise UserError(
                "pre_rope quantization needs the model's rotary embedding: "
                "SinkQuantizedCache(scheme, rotary_embedding=model.model.rotary_emb)"
            )
        self.rows = Rows(self.scheme)
        super().__init__(layer_class_to_replicate=partial(SinkQuantizedLayer, self.scheme, self.rows, rotary_embedding))

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
        if positions.shape[1] > self.scheme.sinks.num_sinks and bool(((positions >= 0).sum(-1) > self.scheme.sinks.num_sinks).any()):
            raise UserError(
                f"a row has more than num_sinks={self.scheme.sinks.num_sinks} sink positions: raise num_sinks or pass fewer"
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
            self.rows.sink_positions = torch.full((batch, self.scheme.sinks.num_sinks), -1, dtype=torch.long, device=device)
        positions = self.rows.sink_positions
        kept = (positions >= 0).sum(-1, keepdim=True).to(device)
        eligible = self.rows.real(batch, length, device)[:, length - new :] & (scores.float() > -math.inf)
        order = scores.float().masked_fill(~eligible, -math.inf).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(new, device=device).expand(batch, new))
        chosen = eligible & (rank < self.scheme.sinks.num_sinks - kept)
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
            return EMPTY
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
