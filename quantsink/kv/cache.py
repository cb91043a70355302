"""SinkQuantizedCache: a transformers KV cache that quantizes keys and values the KIVI / KVQuant
way while keeping attention-sink tokens in full precision (KVSink, arXiv 2508.04257).

    from quantsink.kv.cache import SinkQuantizedCache
    from quantsink.kv.scheme import KVCacheScheme
    cache = SinkQuantizedCache(KVCacheScheme(bits=2, sinks={"method": "kvsink", "num_sinks": 5}))
    cache.set_attention_mask(inputs["attention_mask"])   # left padding: never in any range
    model.generate(**inputs, past_key_values=cache)      # kvsink: a hook calls cache.offer_sinks (transformers >= 5.24: cache=)

How it quantizes a `scales: dynamic` scheme (quantsink.kv.scheme), and stores it packed
(quantsink.kv.storage):

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
  `per_channel` with `keys.ranges: calibrated` (KVQuant's offline per-channel keys): each
  channel of each head and layer has one range, calibrated by kv-static on the calibration
  text over the tokens this cache quantizes; a key is quantized onto it (clipping beyond it)
  as soon as it leaves the residual window, and the ranges are stored once per layer.
* Arithmetic: asymmetric min-max per group (KIVI): codes q = clamp(round((x - min) / scale),
  0, 2^b - 1) with scale = (max - min) / (2^b - 1), read back as q * scale + min; the codes are
  those of `quantizers.functional.quantize` applied to x - min. Each group stores b-bit codes,
  a scale and an offset (its minimum).
* Dense-and-sparse outliers (KVQuant's per-vector outliers): the largest-magnitude
  outlier_fraction of each vector (`KVCacheScheme.outliers_per_vector`: to the nearest integer,
  at least 1) is kept exact and left out of its group's min and max. For values and per-token
  keys a vector is one token's values (keys) over all key/value heads of the layer, heads x
  head_dim entries (KVQuant's per-token vector). For per-channel keys it is one channel of one
  head over its group's `group_size` tokens, the whole of that channel this online cache
  quantizes at once (KVQuant calibrates its per-channel outlier thresholds offline over the
  sequence instead); a group shorter than 1 / (2 outlier_fraction) tokens so keeps 1 of each
  channel's `group_size` values. Calibrated keys count per token vector, as values do, ranking
  entries by how far out of their channel's range they lie, relative to its width.
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
    `offer_sinks` stores them, layers after l_E store them at their own update. With
    `hold=True` (kvsink's `prefill: hold`) the tokens of multi-token calls wait, exact, until a
    one-token call (a decoding step) or `end_prefill`, which decides them all at once: the
    top-k of a whole prompt prefilled in chunks;
  - explicit (`set_sink_positions`, before prefill): every position is decided at once, and
    offered scores are ignored.
* Tokens a forward call adds are returned to attention in full precision (the current chunk
  attends to itself exactly, as in KIVI's prefill); earlier tokens are read back as stored.
* Storage, per layer and kind: the codes bit-packed into uint8 (2, 3 and 4 bits packed, 8 bits
  plain; quantsink.kv.packing), each group's low and high in the model's dtype (fp16 for an fp16
  model, fp32 for the fp32 fixtures; both are entries of the group, so that dtype holds them
  exactly), the outliers sparse (exact value and int16 index within its vector), the residual
  window, undecided tokens and the incomplete key group in an exact tail, the sinks that left it
  in an exact side buffer with their columns. Reads dequantize each layer on the fly, a chunk of
  slots at a time, into a transient tensor that attention gets; nothing dequantized is kept. The
  read-back is bit for bit what the arithmetic computes (the step is recomputed in float32 from
  low and high): the same values, in fp32 and in fp16, as the simulation that kept dequantized
  floats before (tests/kv/test_packed_storage.py). Padding is not stored and reads back as zeros
  (attention masks it).

`bits=16` stores nothing quantized and returns exactly what transformers' `DynamicCache` does.
`SinkQuantizedCache.memory()` accounts for the packed storage at 2 bytes per full-precision
value, range and outlier, and measures the bytes the cache's tensors hold (`KVMemory`).
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
from quantsink.kv.arithmetic import rotate
from quantsink.kv.scheme import KVCacheScheme
from quantsink.kv.storage import EMPTY, ExactColumns, KVMemory, PackedTokens, Rows, held_bytes, packed_memory

# slots dequantized at once when reading: a few MB of float32 intermediates
READ_CHUNK = 1024
RotaryEmbedding = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SinkQuantizedLayer(DynamicLayer):
    """One layer of `SinkQuantizedCache`. Its stored tokens live in packed storage
    (quantsink.kv.storage): per kind, `PackedTokens` for the stream tokens stored quantized and
    `ExactColumns` for the rest. `keys` / `values` give what attention reads back, dequantized
    where stored quantized and exact elsewhere (padding reads back as zeros): a tensor built on
    each access, never kept."""

    is_croppable = False

    def __init__(
        self, scheme: KVCacheScheme, rows: Rows, rotary_embedding: Optional[RotaryEmbedding] = None,
        key_range: Optional[torch.Tensor] = None, exact: bool = False,
    ):
        super().__init__()
        self.scheme = scheme
        # a layer of the scheme's exact_layers stores every token as it came, like DynamicCache
        self.quantizes = scheme.quantizes and not exact
        self.rows = rows
        self.rotary_embedding = rotary_embedding
        self.key_range = key_range  # keys.ranges calibrated: (2, heads, head_dim), low then high
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.exact: dict[str, ExactColumns] = {}
        self.packed: dict[str, PackedTokens] = {}

    # what attention reads: built from storage, so the base class's assignments must be resets
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return self._read("keys") if self.is_initialized else None

    @keys.setter
    def keys(self, value: Optional[torch.Tensor]) -> None:
        self._refuse_assignment(value)

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self._read("values") if self.is_initialized else None

    @values.setter
    def values(self, value: Optional[torch.Tensor]) -> None:
        self._refuse_assignment(value)

    @staticmethod
    def _refuse_assignment(value: Optional[torch.Tensor]) -> None:
        if value is not None:
            raise NotImplementedError("SinkQuantizedCache layers hold packed storage; their keys and values cannot be "
                                      "assigned (offloading and other in-place edits need a DynamicCache)")

    @property
    def quantized_keys(self) -> Optional[torch.Tensor]:
        """Per row, how many stream tokens have their keys stored quantized."""
        return self._count("keys")

    @property
    def quantized_values(self) -> Optional[torch.Tensor]:
        return self._count("values")

    def _count(self, kind: str) -> Optional[torch.Tensor]:
        if not self.is_initialized:
            return None
        return self.packed[kind].count if kind in self.packed else torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, _, self.head_dim = key_states.shape
        num_sinks = self.scheme.sinks.num_sinks
        self.exact = {"keys": ExactColumns(num_sinks), "values": ExactColumns(num_sinks)}
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.rows.check_batch(key_states.shape[0])
        self.rows.check_decided(self.get_seq_length())
        self.exact["keys"].append(key_states)
        self.exact["values"].append(value_states)
        self.length += key_states.shape[-2]
        # read before storing: the tokens of this call reach attention exact
        read = self._read("keys"), self._read("values")
        if self.quantizes:
            self._store()
        return read

    def store_decided(self) -> None:
        """Quantize what became storable when `offer_sinks` decided this layer's newest tokens."""
        if self.is_initialized and self.quantizes:
            self._store()

    def _streams(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real, sinks, stream) (batch, length) bool masks of the cached columns."""
        real = self.rows.real(self.batch, self.length, self.device)
        sinks = self.rows.sinks(real)
        return real, sinks, real & ~sinks

    def _store(self) -> None:
        """Quantize the stream tokens that left the residual window since the last call, and drop
        them from the exact columns."""
        scheme = self.scheme
        group = min(scheme.group_size, self.head_dim)
        if not self.length:
            return
        if self.head_dim % group:
            raise UserError(f"group_size {scheme.group_size} does not divide head_dim {self.head_dim}: "
                            f"pick a divisor of {self.head_dim}")
        real, sinks, stream = self._streams()
        real_index = real.cumsum(-1) - 1
        leaving = stream & (real_index < real.sum(-1, keepdim=True) - scheme.residual_length)
        # undecided tokens are the newest columns, so what leaves stays a prefix of each row's stream
        leaving[:, self.rows.decided_length(self.length) :] = False
        stream_index = stream.cumsum(-1) - 1
        done = leaving.sum(-1)
        grouped_keys = scheme.keys.granularity == "per_channel" and scheme.keys.ranges == "group"
        targets = {"values": done, "keys": done - done % scheme.group_size if grouped_keys else done}
        for kind, upto in targets.items():
            store = self._packed(kind, group)
            exact = self.exact[kind]
            select = stream & (stream_index >= store.count.unsqueeze(-1)) & (stream_index < upto.unsqueeze(-1))
            if bool(select.any()):
                picked = exact.tail.transpose(1, 2)[select[:, exact.start :]]
                if kind == "keys" and scheme.keys.pre_rope:
                    cos, sin = self._rotation(picked, real_index[select])
                    picked = rotate(picked, cos, sin, inverse=True)
                store.store(picked, upto - store.count)
            pending = stream & (stream_index >= store.count.unsqueeze(-1))
            first = torch.where(pending.any(-1), pending.int().argmax(-1), self.length)
            exact.trim(int(first.min()), sinks)

    def _packed(self, kind: str, group: int) -> PackedTokens:
        if kind not in self.packed:
            scheme = self.scheme
            vector = self.heads * self.head_dim
            layout, unit, outliers = "token", 1, scheme.outliers_per_vector(vector)
            if kind == "keys" and scheme.keys.ranges == "calibrated":
                layout = "range"
                self._check_key_range()
            elif kind == "keys" and scheme.keys.granularity == "per_channel":
                layout, unit, outliers = "channel", scheme.group_size, scheme.outliers_per_vector(scheme.group_size)
            self.packed[kind] = PackedTokens(layout, scheme.bits, self.batch, self.heads, self.head_dim, group, unit, outliers,
                                             self.dtype, self.device, self.key_range if layout == "range" else None)
        return self.packed[kind]

    def _check_key_range(self) -> None:
        expected = (2, self.heads, self.head_dim)
        if self.key_range is None or tuple(self.key_range.shape) != expected:
            found = None if self.key_range is None else tuple(self.key_range.shape)
            raise UserError(f"keys.ranges calibrated needs a {expected} key range per layer, "
                            f"found {found}: the ranges belong to another model, calibrate this one (quantsink.quantize)")

    def _read(self, kind: str) -> torch.Tensor:
        """(batch, heads, length, head_dim): what attention reads back of `kind` (class docstring)."""
        exact = self.exact[kind]
        store = self.packed.get(kind)
        tokens = int(store.count.max()) if store is not None else 0
        if exact.start == 0 and not tokens:
            return exact.tail
        real, _, stream = self._streams()
        out = (torch.empty if bool(real[:, : exact.start].all()) else torch.zeros)(
            self.batch, self.heads, self.length, self.head_dim, dtype=self.dtype, device=self.device)
        exact.place(out)
        if tokens:
            self._place_stored(out, kind, store, tokens, real, stream)
        return out

    def _place_stored(self, out: torch.Tensor, kind: str, store: PackedTokens, tokens: int, real: torch.Tensor,
                      stream: torch.Tensor) -> None:
        """Dequantize the stored tokens a chunk of slots at a time (its float32 intermediates stay
        in the processor's cache) and write each chunk into its columns of `out`."""
        rows, columns, slots = self._stored_columns(stream, store.count)
        # rows alike (batch 1, no padding): each row's slots are a few runs of consecutive columns between sinks
        alike = bool((store.count == tokens).all()) and bool((stream == stream[:1]).all())
        if alike:
            first = columns[: tokens]
            breaks = (torch.nonzero(first.diff() != 1).flatten() + 1).tolist()
            starts = [0, *breaks]
            runs = [(begin, int(first[begin]), end - begin) for begin, end in zip(starts, [*breaks, tokens])]
        rotated = kind == "keys" and self.scheme.keys.pre_rope
        if rotated:
            positions = torch.zeros(self.batch, tokens, dtype=torch.long, device=self.device)
            positions[rows, slots] = (real.cumsum(-1) - 1)[rows, columns]
        chunk = max(store.unit, READ_CHUNK // store.unit * store.unit)
        for start in range(0, tokens, chunk):
            stop = min(tokens, start + chunk)
            part = store.read(start, stop)
            if rotated:
                part = self._rotated(part.to(self.dtype), positions[:, start:stop])
            if alike:
                for slot, column, size in runs:
                    low, high = max(slot, start), min(slot + size, stop)
                    if low < high:
                        out[:, :, column + low - slot : column + high - slot] = part[:, :, low - start : high - start]
            else:
                inside = (slots >= start) & (slots < stop)
                chunk_rows = rows[inside]
                out.transpose(1, 2)[chunk_rows, columns[inside]] = part.transpose(1, 2)[chunk_rows, slots[inside] - start].to(self.dtype)

    @staticmethod
    def _stored_columns(stream: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, column, slot) of every stored token: each row's first `count` stream columns."""
        stream_index = stream.cumsum(-1) - 1
        rows, columns = (stream & (stream_index < count.unsqueeze(-1))).nonzero(as_tuple=True)
        return rows, columns, stream_index[rows, columns]

    def _rotated(self, stored: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys (batch, heads, slots, head_dim) rotated at `positions` (batch, slots)."""
        batch, heads, slots, head_dim = stored.shape
        by_token = stored.transpose(1, 2).reshape(batch * slots, heads, head_dim)
        cos, sin = self._rotation(by_token, positions.flatten())
        return rotate(by_token, cos, sin).reshape(batch, slots, heads, head_dim).transpose(1, 2)

    def _rotation(self, picked: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the model's RoPE for (tokens, heads, head_dim) keys at `positions`."""
        cos, sin = self.rotary_embedding(picked, positions.unsqueeze(0))
        return cos[0].unsqueeze(1).to(picked.dtype), sin[0].unsqueeze(1).to(picked.dtype)

    def stream_keys(self) -> torch.Tensor:
        """(tokens, heads, head_dim): the keys of every stream token (real, not a sink) held now,
        as the key quantizer gets them (un-rotated under pre_rope), for calibrating key ranges on
        a cache that stores nothing quantized (quantsink.methods.kv_static)."""
        real, _, stream = self._streams()
        picked = self.keys.transpose(1, 2)[stream]
        if self.scheme.keys.pre_rope:
            cos, sin = self._rotation(picked, (real.cumsum(-1) - 1)[stream])
            picked = rotate(picked, cos, sin, inverse=True)
        return picked

    # --- batch bookkeeping ----------------------------------------------------------------
    def take_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for part in (*self.exact.values(), *self.packed.values()):
            part.take(index)
        self.batch = len(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.take_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.take_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.take_rows(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SinkQuantizedCache cannot crop: quantized tokens cannot be restored (assisted generation "
            "and rollbacks need a DynamicCache)"
        )

    def reset(self) -> None:
        self.is_initialized = False
        self._clear()

    # --- accounting -----------------------------------------------------------------------
    def tensors(self) -> list[Optional[torch.Tensor]]:
        """Every tensor this layer holds (for measuring them)."""
        parts = [*self.exact.values(), *self.packed.values()]
        return [tensor for part in parts for tensor in part.tensors()]

    def memory(self, real_tokens: torch.Tensor) -> KVMemory:
        """Packed-storage bytes of this layer, given each row's number of real tokens."""
        if not self.is_initialized or self.length == 0:
            return EMPTY
        keys, values, tokens = (int(t.sum()) for t in (self.quantized_keys, self.quantized_values, real_tokens))
        return packed_memory(self.scheme, self.heads, self.head_dim, keys, values, tokens)


class SinkQuantizedCache(Cache):
    """A transformers `Cache` for `generate(past_key_values=cache)` (`cache=cache` from
    transformers 5.24) and plain forward calls.

    Call `set_attention_mask` with the prompt's mask when rows are padded. The `kvsink` strategy
    needs its sinks from a hook that calls `offer_sinks` in every forward call (what
    `quantsink.kv_cache(model)` gets for a model from `quantsink.load`), or from
    `set_sink_positions` before prefill. `rotary_embedding` (the model's rotary
    module, called as `rotary_embedding(x, position_ids) -> (cos, sin)`) is needed for
    `pre_rope` only, `key_ranges` ((layers, 2, heads, head_dim): each key channel's calibrated low
    and high) for `keys.ranges: calibrated` only. One cache serves one batch of sequences; `reset`
    empties it for reuse.
    """

    def __init__(
        self, scheme: Optional[KVCacheScheme] = None, rotary_embedding: Optional[RotaryEmbedding | nn.Module] = None,
        key_ranges: Optional[torch.Tensor] = None,
    ):
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
        layer = partial(SinkQuantizedLayer, self.scheme, self.rows, rotary_embedding)
        if self.scheme.keys.ranges == "calibrated" and self.scheme.quantizes:
            if key_ranges is None:
                raise UserError(
                    "keys.ranges calibrated needs the key ranges kv-static calibrated: quantsink.kv_cache(model) of a model "
                    "quantized with this scheme, or SinkQuantizedCache(scheme, key_ranges=(layers, 2, heads, head_dim))"
                )
            super().__init__(layers=[layer(key_range=key_range, exact=index in self.scheme.exact_layers)
                                     for index, key_range in enumerate(key_ranges)])
        else:
            # transformers appends each new layer right after building it: its index is the count so far
            super().__init__(layer_class_to_replicate=lambda: layer(exact=len(self.layers) in self.scheme.exact_layers))

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

    def offer_sinks(self, scores: torch.Tensor, hold: bool = False) -> None:
        """Decide the sink status of the tokens this forward call cached so far, for the `kvsink`
        strategy: `scores` (batch, new) ranks the last `new` cached columns, -inf (or NaN) for
        "never a sink"; padding never is one. Each row keeps the best-scoring offered tokens while
        it has fewer than `num_sinks` sinks (ties: the earlier token), and every decided token is
        final: the layers already updated in this call store now what may be stored. Called by
        the kvsink hook on the emergence layer, so `new` is the whole call's tokens and layer 0's
        length says where they are. Ignored for other strategies and after `set_sink_positions`.

        `hold`: a call of several tokens is part of a prompt, whose tokens wait, exact, with their
        scores; a call of one token per row (a decoding step) or `end_prefill` ends the prompt,
        and the row's top tokens of all that waited and of the call are decided together."""
        if not self.rows.streams_sinks:
            return
        if scores.dim() != 2:
            raise UserError(f"offer_sinks takes (batch, new) scores, got shape {tuple(scores.shape)}")
        length = self.get_seq_length()
        batch, new = scores.shape
        undecided = length - self.rows.decided - self.rows.waiting
        if new != undecided:
            raise UserError(
                f"offer_sinks got scores for {new} tokens but {undecided} cached tokens wait for a "
                "decision: score every token of the forward call, once, after its block updated the cache"
            )
        self.rows.check_batch(batch)
        if self.rows.held is not None:
            scores = torch.cat([self.rows.held.to(scores.device), scores.float()], dim=-1)
        self.rows.held = None
        if hold and new > 1:
            self.rows.held = scores.float()
            return
        self._decide(scores)

    def end_prefill(self) -> None:
        """End a prompt that `offer_sinks(..., hold=True)` keeps waiting (sinks `prefill: hold`,
        quantsink.methods.kvsink): decide its tokens now, each row's top `num_sinks` by score,
        and store what may be stored. For a prompt whose end no decoding step marks, e.g. one
        prefilled in chunks and then scored chunk by chunk."""
        held, self.rows.held = self.rows.held, None
        if held is not None:
            self._decide(held)

    def _decide(self, scores: torch.Tensor) -> None:
        """Give the best of `scores` (batch, n: the last n cached columns) the free sink slots."""
        length = self.get_seq_length()
        batch, new = scores.shape
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
        """Packed-storage accounting over all layers, and the bytes the cache's tensors hold
        (see `KVMemory`)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return EMPTY
        real_tokens = self.rows.real(layers[0].batch, layers[0].length, layers[0].device).sum(-1)
        # every layer holds the same tokens: they count once
        total = KVMemory.sum([layer.memory(real_tokens) for layer in layers])
        held = [tensor for layer in layers for tensor in layer.tensors()]
        held += [self.rows.attention_mask, self.rows.sink_positions, self.rows.held]
        return dataclasses.replace(total, tokens=int(real_tokens.sum()), measured=held_bytes(held))

    def bytes_per_token(self) -> float:
        """Packed-storage bytes per cached token, all layers together."""
        return self.memory().bytes_per_token

    def reset(self) -> None:
        """Empty every layer and forget the attention mask and sink positions."""
        super().reset()
        self.rows.attention_mask = self.rows.sink_positions = None
        self.rows.explicit_sinks, self.rows.decided, self.rows.held = False, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.rows.take(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows.take(indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows.repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)
