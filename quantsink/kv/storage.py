"""What the dynamic cache knows about each row (padding, sinks, which tokens are decided), the
packed storage of its keys and values (`PackedTokens`: codes, ranges, sparse outliers;
`ExactColumns`: the exact tail of every row and the sinks that left it), and what that storage
occupies: accounted as packed storage costs it, and measured as its tensors hold it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from quantsink.errors import UserError
from quantsink.kv.arithmetic import codes_in_range, group_ranges, largest_magnitude_indices, read_back
from quantsink.kv.packing import pack, packed_bytes, unpack
from quantsink.kv.scheme import KVCacheScheme
from quantsink.quantizers.functional import MIN_SCALE

# Storage cost of what is kept in full precision, and of each outlier's position in its vector.
FP16_BYTES = 2
OUTLIER_INDEX_BYTES = 2


@dataclass(frozen=True)
class KVMemory:
    """What the cached keys and values occupy in packed storage, in bytes, against the fp16 cache
    of the same tokens (`baseline`). `tokens` counts the real tokens of all rows (padding is
    free); the byte counts, and so `bytes_per_token`, cover all layers together.

    The accounted fields price every full-precision value, range and outlier at 2 bytes (what an
    fp16 or bf16 model's cache stores), so they describe the storage whatever dtype a fixture
    runs in. `measured` is what the cache's tensors hold right now: unique storages, with their
    capacity slack, the exact buffers, per-row padding and bookkeeping, in the model's dtype
    (an fp32 model holds its ranges and exact values in 4 bytes: about twice the accounting)."""

    tokens: int
    codes: int
    scales_and_offsets: int
    outliers: int
    full_precision: int
    baseline: int
    measured: int = 0

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


def held_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once, with
    all of it: a slice keeps its whole storage alive)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


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


class PackedTokens:
    """The stream tokens of one layer's keys or values stored quantized: per row its first
    `count[row]` stream tokens (quantsink.kv.cache says which tokens stream), in stream order,
    in units of `unit` tokens (one token; a key group for per-channel keys). Rows that hold fewer
    units than others leave their last slots unused (left padding, sinks: a few tokens).

    Every array has the row first and then (heads,) units:
    * codes, uint8: (batch, heads, units, packed_bytes(unit * head_dim)), the unit's codes of one
      head packed along its tokens' channels (quantsink.kv.packing);
    * ranges, the model's dtype, (low, high) in the last dimension: `layout` "token", groups of
      `group` channels of one token, (batch, heads, tokens, head_dim // group, 2); "channel", each
      channel of each head over the unit, (batch, heads, units, head_dim, 2); "range" (calibrated
      keys), none: every token uses `key_range` (2, heads, head_dim), held as given;
    * sparse outliers, `outliers` per vector, their exact values in the model's dtype and int16
      indices within their vector: "token" / "range", a token's heads x head_dim entries,
      (batch, units, outliers); "channel", one channel of one head over the unit's tokens,
      (batch, heads, units, head_dim, outliers).

    Low and high are entries of the quantized vectors (or 0), so the model's dtype holds them
    exactly and the read-back recomputes the float32 step from them: the arithmetic of
    quantsink.kv.arithmetic bit for bit, in fp16 as in fp32. Capacity grows by `GROWTH` tokens
    at a time, never by doubling."""

    GROWTH = 128

    def __init__(
        self, layout: str, bits: int, batch: int, heads: int, head_dim: int, group: int, unit: int, outliers: int,
        dtype: torch.dtype, device: torch.device, key_range: Optional[torch.Tensor] = None,
    ):
        self.layout, self.bits, self.heads, self.head_dim, self.group, self.unit = layout, bits, heads, head_dim, group, unit
        self.outliers, self.dtype, self.key_range = outliers, dtype, key_range
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        channel = layout == "channel"
        shapes = {"codes": ((heads, packed_bytes(unit * head_dim, bits)), torch.uint8)}
        if layout != "range":
            shapes["ranges"] = ((heads, head_dim, 2) if channel else (heads, head_dim // group, 2), dtype)
        if outliers:
            spread = (heads, head_dim, outliers) if channel else (outliers,)
            shapes.update(outlier_values=(spread, dtype), outlier_index=(spread, torch.int16))
        # the unit dimension: after the heads where an array has them
        self.arrays = {name: torch.zeros(batch, *shape[:1], 0, *shape[1:], dtype=kind, device=device)
                       if len(shape) > 1 else torch.zeros(batch, 0, *shape, dtype=kind, device=device)
                       for name, (shape, kind) in shapes.items()}
        self._unit_dims = {name: 2 if len(shape) > 1 else 1 for name, (shape, _) in shapes.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, *self.arrays.values()] + ([self.key_range] if self.key_range is not None else [])

    def store(self, picked: torch.Tensor, new: torch.Tensor) -> None:
        """Quantize `picked` (tokens, heads, head_dim): each row's `new[row]` next stream tokens,
        row after row (a whole number of units per row), and keep their packed form."""
        units = new // self.unit
        rows = torch.repeat_interleave(torch.arange(len(new), device=new.device), units)
        slots = (self.count // self.unit)[rows] + torch.arange(len(rows), device=new.device) - (units.cumsum(0) - units)[rows]
        self._reserve(int((self.count + new).max()) // self.unit)
        for name, part in self._encode(picked).items():
            array = self.arrays[name]
            if self._unit_dims[name] == 2:
                array[rows, :, slots] = part
            else:
                array[rows, slots] = part
        self.count = self.count + new

    def _reserve(self, units: int) -> None:
        for name, array in self.arrays.items():
            dim = self._unit_dims[name]
            if array.shape[dim] < units:
                shape = list(array.shape)
                # exactly what a prefill needs; a chunk more when decoding outgrows it
                shape[dim] = units if array.shape[dim] == 0 else units + max(1, self.GROWTH // self.unit)
                grown = torch.zeros(shape, dtype=array.dtype, device=array.device)
                grown.narrow(dim, 0, array.shape[dim]).copy_(array)
                self.arrays[name] = grown

    def _encode(self, picked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes, ranges and outliers of `picked` (tokens, heads, head_dim), one entry per unit.
        Outliers are ranked on the model's dtype, as the arithmetic ranks them."""
        tokens, heads, head_dim = picked.shape
        parts = {}
        if self.layout == "channel":  # (units, heads, head_dim, unit tokens): one range per channel of a unit
            grouped = picked.reshape(-1, self.unit, heads, head_dim).movedim(1, -1)
            mask, index = largest_magnitude_indices(grouped, self.outliers)
            low, high = group_ranges(grouped, mask if self.outliers else None)
            codes = codes_in_range(grouped.float(), low, high, self.bits).movedim(-1, 2).reshape(-1, heads, self.unit * head_dim)
            parts["ranges"] = torch.cat([low, high], dim=-1).to(self.dtype)
            if self.outliers:
                parts["outlier_values"] = grouped.gather(-1, index)
        else:
            work = picked.float()
            if self.layout == "range":
                low, high = self.key_range.to(picked.device)
                # a token's outliers: the entries farthest out of their channel's range, relative to its width
                spread = ((2 * work - (low + high)).abs() / (high - low).clamp_min(MIN_SCALE)).flatten(1)
                mask, index = largest_magnitude_indices(spread, self.outliers)
                codes = codes_in_range(work, low, high, self.bits)
            else:
                mask, index = largest_magnitude_indices(picked.flatten(1), self.outliers)
                grouped = picked.reshape(tokens, heads, -1, self.group)
                low, high = group_ranges(grouped, mask.reshape(grouped.shape) if self.outliers else None)
                codes = codes_in_range(grouped.float(), low, high, self.bits).reshape(tokens, heads, head_dim)
                parts["ranges"] = torch.cat([low, high], dim=-1).to(self.dtype)
            if self.outliers:
                parts["outlier_values"] = picked.flatten(1).gather(-1, index)
        if self.outliers:
            parts["outlier_index"] = index.to(torch.int16)
        parts["codes"] = pack(codes, self.bits)
        return parts

    def read(self, start: int, stop: int) -> torch.Tensor:
        """float32 (batch, heads, stop - start, head_dim): the read-back of slots [start, stop)
        (whole units) of every row, outliers exact; a row holds its tokens in its first
        `count[row]` slots only."""
        first, units = start // self.unit, (stop - start) // self.unit
        arrays = {name: array.narrow(self._unit_dims[name], first, units) for name, array in self.arrays.items()}
        batch, heads, head_dim, tokens = self.count.shape[0], self.heads, self.head_dim, stop - start
        codes = unpack(arrays["codes"], self.bits, self.unit * head_dim).float()
        if self.layout == "range":
            low, high = (bound.unsqueeze(1) for bound in self.key_range)
            values = read_back(codes, low, high, self.bits)
        else:
            low, high = (bound.float().contiguous() for bound in arrays["ranges"].unbind(-1))
            if self.layout == "channel":  # (batch, heads, units, 1, head_dim) against the unit's tokens
                grouped = codes.view(batch, heads, units, self.unit, head_dim)
                low, high = low.unsqueeze(3), high.unsqueeze(3)
            else:
                grouped = codes.view(batch, heads, tokens, head_dim // self.group, self.group)
                low, high = low.unsqueeze(-1), high.unsqueeze(-1)
            values = read_back(grouped, low, high, self.bits)
        if self.outliers:
            values.view(-1)[self._outlier_positions(arrays["outlier_index"].long(), units)] = arrays["outlier_values"].float()
        return values.view(batch, heads, tokens, head_dim)

    def _outlier_positions(self, index: torch.Tensor, units: int) -> torch.Tensor:
        """Flat positions in the (batch, heads, tokens, head_dim) read-back of the outliers at `index`."""
        batch, heads, head_dim, device = self.count.shape[0], self.heads, self.head_dim, index.device
        if self.layout == "channel":  # (batch, heads, units, head_dim, k): index = token within the unit
            shape = (batch, heads, units, head_dim, 1)
            row, head, unit, channel = (torch.arange(size, device=device).view(*[size if d == i else 1 for d in range(5)])
                                        for i, size in enumerate(shape[:4]))
            return (((row * heads + head) * units + unit) * self.unit + index) * head_dim + channel
        row = torch.arange(batch, device=device).view(batch, 1, 1)
        token = torch.arange(units, device=device).view(1, units, 1)
        return ((row * heads + index // head_dim) * units + token) * head_dim + index % head_dim

    def take(self, index: torch.Tensor) -> None:
        self.count = self.count[index.to(self.count.device)]
        self.arrays = {name: array[index.to(array.device)] for name, array in self.arrays.items()}


class ExactColumns:
    """The exact keys or values of one layer: every row's columns from `start` on (`tail`: the
    residual window, undecided tokens, an incomplete key group, and for a row whose quantized
    tokens end later than another's, a few already stored), and the sinks among earlier columns
    (`sinks`, (batch, num_sinks, heads, head_dim), at `sink_columns`, -1 where a slot is free).
    Padding before `start` is dropped."""

    def __init__(self, num_sinks: int):
        self.num_sinks = num_sinks
        self.tail: Optional[torch.Tensor] = None
        self.start = 0
        self.sinks: Optional[torch.Tensor] = None
        self.sink_columns: Optional[torch.Tensor] = None

    def tensors(self) -> list[Optional[torch.Tensor]]:
        return [self.tail, self.sinks, self.sink_columns]

    def append(self, states: torch.Tensor) -> None:
        self.tail = states.contiguous().clone() if self.tail is None else torch.cat([self.tail, states], dim=-2)

    def trim(self, start: int, sinks: torch.Tensor) -> None:
        """Drop the columns before `start`, moving the sinks (`sinks`: (batch, length) bool) among
        them to the side buffer."""
        cut = start - self.start
        if cut <= 0:
            return
        moving = sinks[:, self.start : start]
        if bool(moving.any()):
            batch, heads, _, head_dim = self.tail.shape
            if self.sinks is None:
                self.sinks = self.tail.new_zeros(batch, self.num_sinks, heads, head_dim)
                self.sink_columns = torch.full((batch, self.num_sinks), -1, dtype=torch.long, device=self.tail.device)
            rows, columns = moving.nonzero(as_tuple=True)
            slots = (self.sink_columns >= 0).sum(-1)[rows] + (moving.cumsum(-1) - 1)[rows, columns]
            self.sinks[rows, slots] = self.tail[rows, :, columns]
            self.sink_columns[rows, slots] = columns + self.start
        self.tail = self.tail[:, :, cut:].clone()
        self.start = start

    def place(self, out: torch.Tensor) -> None:
        """Write the exact columns into `out` (batch, heads, length, head_dim)."""
        out[:, :, self.start :] = self.tail
        if self.sinks is not None:
            rows, slots = (self.sink_columns >= 0).nonzero(as_tuple=True)
            out.transpose(1, 2)[rows, self.sink_columns[rows, slots]] = self.sinks[rows, slots]

    def take(self, index: torch.Tensor) -> None:
        for name in ("tail", "sinks", "sink_columns"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[index.to(tensor.device)])


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
