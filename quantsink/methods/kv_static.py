"""kv-static: the static scales of a KV cache scheme with `scales: static` (quantsink.kv.scheme;
the recipe's kv_cache section implies this method, which is never listed in `methods`): static
symmetric integer quantization of a causal LM's KV cache, what llm-compressor writes as
`kv_cache_scheme` and vLLM serves: one scale per layer for the keys and one for the values
(`per_head`: one per key/value head), calibrated on the calibration text as the largest |K| and
|V| the scheme's observer sees (padding left out).

What is quantized is what each attention hands its cache: keys after RoPE, and values,
quantize-dequantized there (through the adapter's `transform_kv`), so the attention sees them as
the cache would keep them, in the prefill as in every later step, with or without a cache. That
is where compressed-tensors' QuantizedKVCache quantizes a checkpoint's kv_cache_scheme when
transformers loads it, and the rounding is its rounding (`fake_quantize_signed_grid`: the grid
reaches -2^(b-1), one level below quantsink's symmetric one), so a compressed-tensors export
loaded with `from_pretrained` computes what this model computes.

Methods run before the quantizer, so the scales are those of the full-precision model, and the
quantizer calibrates its activations downstream of the quantized cache; keys and values the
quantized weights push beyond the calibrated range clip.

A dynamic scheme with `keys.ranges: calibrated` (KVQuant's offline per-channel keys) implies this
method too: it observes, with the scheme's observer, the keys of every channel of each layer
over the tokens SinkQuantizedCache would quantize (real, not sinks: the kvsink predictor, run
before, offers them; un-rotated under `pre_rope`), each calibration batch prefilled at once
through an exact cache of the scheme, and leaves the ranges on the model, where the quantsink
KV cache backend builds its caches from them. Values stay per token, computed online.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from quantsink.kv.arithmetic import fake_quantize_signed_grid
from quantsink.errors import CheckpointError, UserError
from quantsink.kv.backends import KEY_RANGES_ATTRIBUTE
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.models.capabilities import KVCacheHost
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.quantizers.functional import qparams_from_range, qrange
from quantsink.registry import METHODS, OBSERVERS


def observed_rows(states: torch.Tensor, mask: torch.Tensor | None, granularity: str) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) keys or values as an observer's (groups, n) rows: one row
    per head, or one for all; only the real tokens of the (batch, tokens) mask."""
    tokens = states.transpose(1, 2)
    tokens = tokens.flatten(0, 1) if mask is None else tokens[mask.bool()]
    rows = tokens.transpose(0, 1).flatten(1)
    return rows.reshape(1, -1) if granularity == "per_tensor" else rows


@torch.no_grad()
def calibrate(
    adapter: Adapter, batches: list[dict[str, torch.Tensor]], scheme: KVCacheScheme, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, groups) scales of the keys and of the values, from a full pass over `batches`."""
    observer = OBSERVERS.get(scheme.observer)
    observers = [(observer(scheme.bits, True), observer(scheme.bits, True)) for _ in range(adapter.num_blocks)]
    batch_mask: dict[str, torch.Tensor | None] = {}

    def observing(block: int):
        def transform(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for block_observer, states in zip(observers[block], (keys, values)):
                block_observer.observe(observed_rows(states, batch_mask["mask"], scheme.keys.granularity))
            return keys, values

        return transform

    handles = [adapter.transform_kv(block, observing(block)) for block in range(adapter.num_blocks)]
    try:
        for batch in tqdm(batches, desc="kv-static", unit="batch", disable=not progress):
            batch_mask["mask"] = batch.get("attention_mask")
            adapter.embed(batch)  # runs without a cache: each attention sees the whole sequence once
    finally:
        for handle in handles:
            handle.remove()
    scales = [[qparams_from_range(*each.range(), scheme.bits, symmetric=True)[0] for each in pair] for pair in observers]
    return torch.stack([keys for keys, _ in scales]), torch.stack([values for _, values in scales])


def install(adapter: Adapter, key_scales: torch.Tensor, value_scales: torch.Tensor, bits: int) -> HandleSet:
    """Quantize every attention's keys and values with its row of (blocks, groups) scales,
    proven by a probe forward to run in every block."""
    with installing(adapter.model, "kv-static") as handles:
        tallies = []
        for block in range(adapter.num_blocks):
            key_scale, value_scale = key_scales[block].reshape(-1, 1, 1), value_scales[block].reshape(-1, 1, 1)

            def quantize(keys: torch.Tensor, values: torch.Tensor, key_scale=key_scale, value_scale=value_scale):
                return fake_quantize_signed_grid(keys, key_scale, bits), fake_quantize_signed_grid(values, value_scale, bits)

            tallies.append(Tally(f"the kv-static K/V quantization of decoder block {block}"))
            handles.add(adapter.transform_kv(block, quantize, tallies[-1]))
        require_runs(adapter.model, tallies, lambda: adapter.embed(adapter.probe_inputs()))
    return handles


@torch.no_grad()
def calibrate_key_ranges(
    adapter: Adapter, batches: list[dict[str, torch.Tensor]], scheme: KVCacheScheme, progress: bool = True
) -> torch.Tensor:
    """(blocks, 2, heads, head_dim) low and high of every key channel (module docstring)."""
    observer = OBSERVERS.get(scheme.observer)
    observers = [observer(scheme.bits, False) for _ in range(adapter.num_blocks)]
    exact = scheme.model_copy(update={"bits": 16})
    rotary = adapter.rotary_embedding() if scheme.keys.pre_rope else None
    shape = None
    for batch in tqdm(batches, desc="kv-static key ranges", unit="batch", disable=not progress):
        cache = SinkQuantizedCache(exact, rotary_embedding=rotary)
        mask = batch.get("attention_mask")
        if mask is not None:
            cache.set_attention_mask(mask)
        # generate's positions (each row's real-token index), which the cache un-rotates with
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0) if mask is not None else None
        adapter.model(**batch, position_ids=positions, **{adapter.call_cache_keyword: cache}, use_cache=True)
        cache.end_prefill()  # a held prompt (kvsink prefill: hold) decides its sinks now
        if scheme.sinks.method == "kvsink" and cache.rows.sink_positions is None:
            raise UserError("kv-static calibrates the key ranges on the tokens the kvsink sinks leave, but no kvsink "
                            "predictor offered sinks: run the kvsink method first (the kv_cache section orders them so)")
        for block_observer, layer in zip(observers, cache.layers):
            keys = layer.stream_keys()
            shape = keys.shape[1:]
            block_observer.observe(keys.flatten(1).T)
    ranges = [torch.stack(each.range()).reshape(2, *shape) for each in observers]
    return torch.stack(ranges)


def checked_key_ranges(adapter: Adapter, ranges: torch.Tensor | None) -> torch.Tensor:
    heads = adapter.num_key_value_heads
    if (ranges is None or ranges.dim() != 4 or ranges.shape[:3] != (adapter.num_blocks, 2, heads)
            or not bool(ranges.isfinite().all()) or not bool((ranges[:, 0] <= ranges[:, 1]).all())):
        found = "missing" if ranges is None else f"{tuple(ranges.shape)}"
        raise CheckpointError(
            f"kv-static/key_ranges must be finite (low <= high) ({adapter.num_blocks}, 2, {heads}, head_dim) ranges, "
            f"found {found}: the folder belongs to another model, quantize this one again"
        )
    return ranges


def install_key_ranges(adapter: Adapter, key_ranges: torch.Tensor) -> HandleSet:
    """Leave the calibrated key ranges on the model for the caches the backend builds."""
    model = adapter.model
    with installing(model, "kv-static") as handles:
        setattr(model, KEY_RANGES_ATTRIBUTE, key_ranges)
        handles.on_remove(lambda: model.__dict__.pop(KEY_RANGES_ATTRIBUTE, None))
    return handles


@METHODS.register("kv-static")
class KVStatic(Method):
    name = "kv-static"
    options_model = KVCacheScheme
    requires = (KVCacheHost,)

    def __init__(self, options: KVCacheScheme):
        super().__init__(options)
        self.key_scales: torch.Tensor | None = None  # (blocks, groups)
        self.value_scales: torch.Tensor | None = None
        self.key_ranges: torch.Tensor | None = None  # keys.ranges calibrated: (blocks, 2, heads, head_dim)

    @property
    def calibrates_key_ranges(self) -> bool:
        return self.options.keys.ranges == "calibrated"

    def apply(self, context: MethodContext) -> dict[str, Any]:
        if self.calibrates_key_ranges:
            self.key_ranges = calibrate_key_ranges(context.adapter, context.calibration_batches, self.options, context.progress)
            install_key_ranges(context.adapter, self.key_ranges)
            low, high = self.key_ranges.unbind(1)
            return {"scheme": self.options.describe(), "key_range_width_mean": (high - low).flatten(1).mean(1).tolist()}
        self.key_scales, self.value_scales = calibrate(context.adapter, context.calibration_batches, self.options, context.progress)
        install(context.adapter, self.key_scales, self.value_scales, self.options.bits)
        largest = qrange(self.options.bits, symmetric=True)[1]
        return {
            "scheme": self.options.describe(),
            "key_absmax": (self.key_scales.amax(dim=1) * largest).tolist(),
            "value_absmax": (self.value_scales.amax(dim=1) * largest).tolist(),
        }

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.calibrates_key_ranges:
            return {"options": self.options.model_dump(mode="json")}, {"key_ranges": self.key_ranges}
        return {"options": self.options.model_dump(mode="json")}, {"key_scales": self.key_scales, "value_scales": self.value_scales}

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "KVStatic":
        try:
            method = cls(KVCacheScheme.model_validate(state["options"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the kv-static state is malformed ({error}): quantize the model again") from None
        if method.calibrates_key_ranges:
            method.key_ranges = checked_key_ranges(adapter, tensors.get("key_ranges"))
            install_key_ranges(adapter, method.key_ranges)
            return method
        if method.options.scales != "static":
            raise CheckpointError("the kv-static state holds a scheme with neither static scales nor calibrated key ranges: "
                                  "quantize the model again")
        groups = 1 if method.options.keys.granularity == "per_tensor" else adapter.num_key_value_heads
        for key in ("key_scales", "value_scales"):
            scales = tensors.get(key)
            if scales is None or scales.shape != (adapter.num_blocks, groups) or not bool(((scales > 0) & scales.isfinite()).all()):
                found = "missing" if scales is None else f"{tuple(scales.shape)}"
                raise CheckpointError(
                    f"kv-static/{key} must be finite positive ({adapter.num_blocks}, {groups}) scales, found {found}: "
                    "the folder belongs to another model, quantize this one again"
                )
        method.key_scales, method.value_scales = tensors["key_scales"], tensors["value_scales"]
        install(adapter, method.key_scales, method.value_scales, method.options.bits)
        return method

    def compressed_tensors_kv_cache(self, adapter: Adapter) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]]:
        """compressed-tensors holds a scale of shape (1,) per attention (`tensor`), or
        (heads, 1, 1) (`attn_head`), under the attention's own name. Calibrated key ranges belong
        to quantsink's dynamic cache, which no kv_cache_scheme states: none (quantsink's state
        keeps them)."""
        if self.calibrates_key_ranges:
            return None, {}
        shape = (1,) if self.options.keys.granularity == "per_tensor" else (-1, 1, 1)
        names = {id(module): name for name, module in adapter.model.named_modules()}
        tensors = {}
        for block in range(adapter.num_blocks):
            attention = names[id(adapter.attention(block))]
            # clones: safetensors refuses tensors that share storage
            tensors[f"{attention}.k_scale"] = self.key_scales[block].reshape(shape).clone()
            tensors[f"{attention}.v_scale"] = self.value_scales[block].reshape(shape).clone()
        return self.options.compressed_tensors(), tensors
