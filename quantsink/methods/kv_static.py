"""kv-static: the static scales of a KV cache scheme with `scales: static` (quantsink.kv.scheme;
the recipe's kv_cache section implies this method, which is never listed in `methods`): static
symmetric integer or fp8 (e4m3) quantization of a causal LM's KV cache, what llm-compressor
writes as `kv_cache_scheme` and vLLM serves: one scale per layer for the keys and one for the
values (`per_head`: one per key/value head), calibrated on the calibration text as the largest
|K| and |V| the scheme's observer sees (padding left out), over 2^(b-1) - 1 for integers and
over 448 for fp8 (compressed-tensors' `calculate_qparams`).

Sinks (`kv_cache.sinks`, pfn or kvsink): engines let every token set the static range, so one
massive sink key widens the grid of all the others. Here the sinks are left out of the observed
range, decided per forward call as the model runs (`CallSinks`): pfn, each row's first
`num_sinks` real tokens; kvsink, the top-scoring tokens of block l_E's output under the kvsink
predictor's profile (run before; quantsink.methods.kvsink), each row keeping its best offered
tokens while it has fewer than `num_sinks`, across the calls that share a cache (kvsink's
`prefill: stream` rule). The attentions before l_E run before its output exists, so a kvsink
call first runs the model up to block l_E with exact keys and values (on a DynamicCache the
call's updates are undone after), scores the call's tokens, then runs the call: one partial
forward more per call, the price of quantizing every non-sink token in every layer, as an
engine would. `sinks.at_inference: exact` leaves the sinks' keys and values exact at inference
too; `quantized` quantizes them on the scales computed without them, which is what a loader of
the compressed-tensors export computes (it knows nothing of sinks), so that configuration is
the one whose logits `from_pretrained` reproduces. The quantizer calibrating downstream sees
the partial forward's activations as well (exact K/V in blocks <= l_E for the call's tokens).

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

import logging
import weakref
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from quantsink.kv.arithmetic import FLOAT8_MAX, fake_quantize_float8, fake_quantize_signed_grid
from quantsink.errors import CheckpointError, UserError
from quantsink.kv.backends import KEY_RANGES_ATTRIBUTE
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.models.capabilities import KVCacheHost
from quantsink.kv.scheme import KVCacheScheme, KVSinks
from quantsink.methods.base import Method, MethodContext
from quantsink.methods.kvsink import PREDICTOR_ATTRIBUTE, SinkProfile, sink_scores
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.causal_lm import cache_in_call
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.quantizers.functional import MIN_SCALE, qparams_from_range
from quantsink.registry import METHODS, OBSERVERS

log = logging.getLogger(__name__)


def largest_level(bits: int, type: str) -> float:
    """What a scale of the `bits`-bit `type` (KVCacheScheme.type) grid is multiplied by to give
    the largest |x| the grid holds: 2^(b-1) - 1 (quantsink's symmetric integers) or 448 (fp8)."""
    return FLOAT8_MAX if type == "float" else 2 ** (bits - 1) - 1


def static_scale(low: torch.Tensor, high: torch.Tensor, bits: int, type: str) -> torch.Tensor:
    """The symmetric scale that maps the observed [low, high] onto the grid."""
    if type == "float":
        return (torch.maximum(low.abs(), high.abs()) / FLOAT8_MAX).clamp_min(MIN_SCALE)
    return qparams_from_range(low, high, bits, symmetric=True)[0]


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int, type: str) -> torch.Tensor:
    """x on the grid, as compressed-tensors' QuantizedKVCache quantizes it."""
    return fake_quantize_float8(x, scale) if type == "float" else fake_quantize_signed_grid(x, scale, bits)


class _Scored(Exception):
    """Ends the partial forward of a kvsink prediction at block l_E, carrying the scores."""

    def __init__(self, scores: torch.Tensor):
        super().__init__("kvsink scores")
        self.scores = scores


class CallSinks:
    """Which tokens of the running forward call are sinks (module docstring): `current`,
    (batch, new tokens) bool, set before the call runs; `predicting`, True during the partial
    forward of a kvsink prediction, whose keys and values the transforms leave alone."""

    def __init__(self, sinks: KVSinks, predictor: Optional[tuple[SinkProfile, Any]]):
        if sinks.method == "kvsink" and predictor is None:
            raise UserError("kv_cache.sinks.method kvsink with static scales needs the kvsink predictor, and none is "
                            "installed: run the kvsink method first (the kv_cache section orders them so)")
        self.sinks, self.predictor = sinks, predictor
        self.current: Optional[torch.Tensor] = None
        self.predicting = False
        self.kept: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()  # cache -> (batch,)
        self.handles: Optional[HandleSet] = None

    def install(self, adapter: Adapter) -> HandleSet:
        """Decide every forward call's sinks before it runs; a probe forward proves it does."""
        model, tallies = adapter.model, [Tally("the static-scale sink decision before each forward call")]

        def decide(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not self.predicting:
                self.current = self._decide(module, args, kwargs)
                tallies[0].ran()

        def done(*_: Any) -> None:
            if not self.predicting:
                self.current = None

        with installing(model, "kv-static-sinks") as handles:
            handles.carries(self)  # the call's sinks, decided before it, read by every block's attention
            handles.add(model.register_forward_pre_hook(decide, with_kwargs=True))
            handles.add(model.register_forward_hook(done))
            if self.sinks.method == "kvsink":
                handles.needs_whole_forwards(
                    "kv_cache.sinks kvsink with static scales predicts each call's sinks with a forward to block "
                    "l_E before block 0 runs, which a pass one block at a time cannot do: use pipeline: in_memory, "
                    "or sinks: {method: pfn}")
                profile, options = self.predictor
                tallies.append(Tally(f"the static-scale kvsink scores on decoder block {profile.emergence_layer}"))

                def score(_module: nn.Module, _args: tuple, output: Any) -> None:
                    if self.predicting:
                        tallies[1].ran()
                        raise _Scored(sink_scores(hidden_states_of(output), profile, options))

                handles.add(adapter.blocks()[profile.emergence_layer].register_forward_hook(score))
            require_runs(model, tallies, lambda: adapter.embed(adapter.probe_inputs()))
        self.handles = handles
        return handles

    def forward_state(self) -> Optional[torch.Tensor]:
        return self.current

    def load_forward_state(self, state: Optional[torch.Tensor]) -> None:
        self.current = state

    def _decide(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, count = tokens.shape[:2]
        cache, mask = cache_in_call(kwargs), kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise UserError(f"static KV scales with sinks read each call's 2-D attention mask, got {mask.dim()}-D: "
                            "pass the (batch, tokens) padding mask")
        past = cache.get_seq_length() if cache is not None else 0
        real = torch.ones(batch, count, dtype=torch.bool, device=tokens.device) if mask is None else mask[:, -count:].bool()
        if self.sinks.method == "pfn":
            index = (mask.long().cumsum(-1) - 1)[:, -count:] if mask is not None else (
                past + torch.arange(count, device=tokens.device).expand(batch, count))
            return real & (index < self.sinks.num_sinks)
        scores = self._scores(module, args, kwargs, cache, past).masked_fill(~real, float("-inf"))
        kept = self.kept.get(cache) if cache is not None else None
        kept = torch.zeros(batch, dtype=torch.long, device=scores.device) if kept is None else kept
        if kept.shape[0] != batch:
            raise UserError(f"this cache kept static-scale sinks for {kept.shape[0]} rows but the model runs {batch}: "
                            "use one cache per batch (beam search and num_return_sequences repeat rows)")
        top = scores.topk(min(self.sinks.num_sinks, count), dim=-1)
        rank = torch.arange(top.values.shape[1], device=scores.device)
        chosen = top.values.isfinite() & (rank < (self.sinks.num_sinks - kept).unsqueeze(-1))
        sinks = torch.zeros_like(real).scatter(-1, top.indices, chosen)
        if cache is not None:
            self.kept[cache] = kept + sinks.sum(-1)
        return sinks

    def _scores(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], cache: Any, past: int) -> torch.Tensor:
        """The kvsink scores of the call's tokens, from a forward that stops at block l_E."""
        if cache is not None and not isinstance(cache, DynamicCache):
            if past:
                raise UserError(f"static KV scales with kvsink sinks predict each call's sinks on a copy of its cache, "
                                f"which a {type(cache).__name__} does not allow: use a DynamicCache (quantsink.kv_cache(model))")
            kwargs = {key: value for key, value in kwargs.items() if value is not cache}  # empty: nothing to attend
        saved = None if not isinstance(cache, DynamicCache) else (
            len(cache.layers), [dict(vars(layer)) for layer in cache.layers])
        self.predicting = True
        try:
            module(*args, **kwargs)
        except _Scored as scored:
            return scored.scores
        finally:
            self.predicting = False
            if saved is not None:  # undo the partial forward's updates: DynamicLayer.update rebinds, never writes in place
                del cache.layers[saved[0]:]
                for layer, state in zip(cache.layers, saved[1]):
                    vars(layer).clear()
                    vars(layer).update(state)
        raise UserError(f"the static-scale sink prediction ran the model, and its forward returned before decoder block "
                        f"{self.predictor[0].emergence_layer} scored the tokens: give it a plain causal LM forward")


def call_sinks(adapter: Adapter, sinks: KVSinks) -> Optional[CallSinks]:
    """The per-call sink decision a scheme's sinks need, installed on the model, or None."""
    if sinks.method == "none":
        return None
    decision = CallSinks(sinks, adapter.model.__dict__.get(PREDICTOR_ATTRIBUTE))
    decision.install(adapter)
    return decision


def observed_rows(states: torch.Tensor, mask: torch.Tensor | None, granularity: str) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) keys or values as an observer's (groups, n) rows: one row
    per head, or one for all; only the tokens the (batch, tokens) mask keeps."""
    tokens = states.transpose(1, 2)
    tokens = tokens.flatten(0, 1) if mask is None else tokens[mask.bool()]
    rows = tokens.transpose(0, 1).flatten(1)
    return rows.reshape(1, -1) if granularity == "per_tensor" else rows


@torch.no_grad()
def calibrate(
    adapter: Adapter, batches: list[dict[str, torch.Tensor]], scheme: KVCacheScheme, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, groups) scales of the keys and of the values, from a full pass over `batches`,
    with the scheme's sinks left out of the observed range."""
    observer = OBSERVERS.get(scheme.observer)
    observers = [(observer(scheme.bits, True), observer(scheme.bits, True)) for _ in range(adapter.num_blocks)]
    batch_mask: dict[str, torch.Tensor | None] = {}
    sinks = call_sinks(adapter, scheme.sinks)

    def observing(block: int):
        def transform(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if sinks is not None and sinks.predicting:
                return keys, values
            observed = batch_mask["mask"]
            if sinks is not None:
                observed = ~sinks.current if observed is None else observed.bool() & ~sinks.current
            for block_observer, states in zip(observers[block], (keys, values)):
                block_observer.observe(observed_rows(states, observed, scheme.keys.granularity))
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
        if sinks is not None:
            sinks.handles.remove()
    scales = [[static_scale(*each.range(), scheme.bits, scheme.type) for each in pair] for pair in observers]
    return torch.stack([keys for keys, _ in scales]), torch.stack([values for _, values in scales])


def install(
    adapter: Adapter, key_scales: torch.Tensor, value_scales: torch.Tensor, bits: int, type: str = "int",
    sinks: KVSinks = KVSinks(),
) -> HandleSet:
    """Quantize every attention's keys and values with its row of (blocks, groups) scales onto
    the `bits`-bit `type` grid, the `sinks` left exact when their `at_inference` is exact, proven
    by a probe forward to run in every block."""
    exact = sinks.method != "none" and sinks.at_inference == "exact"
    with installing(adapter.model, "kv-static") as handles:
        handles.carries()  # each block quantizes its own keys and values; the sinks are kv-static-sinks'
        decision = call_sinks(adapter, sinks) if exact else None
        if decision is not None:
            handles.add(decision.handles)
        tallies = []
        for block in range(adapter.num_blocks):
            key_scale, value_scale = key_scales[block].reshape(-1, 1, 1), value_scales[block].reshape(-1, 1, 1)

            def quantize(keys: torch.Tensor, values: torch.Tensor, key_scale=key_scale, value_scale=value_scale):
                if decision is not None and decision.predicting:
                    return keys, values
                quantized = fake_quantize_static(keys, key_scale, bits, type), fake_quantize_static(values, value_scale, bits, type)
                if decision is None:
                    return quantized
                keep = decision.current[:, None, :, None].to(keys.device)
                return torch.where(keep, keys, quantized[0]), torch.where(keep, values, quantized[1])

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
        handles.carries()
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
        self.install(context.adapter)
        largest = largest_level(self.options.bits, self.options.type)
        return {
            "scheme": self.options.describe(),
            "key_absmax": (self.key_scales.amax(dim=1) * largest).tolist(),
            "value_absmax": (self.value_scales.amax(dim=1) * largest).tolist(),
            **({"exact_tokens": record} if (record := self.exact_tokens(context.adapter)) else {}),
        }

    def install(self, adapter: Adapter) -> HandleSet:
        scheme = self.options
        return install(adapter, self.key_scales, self.value_scales, scheme.bits, scheme.type, scheme.sinks)

    def exact_tokens(self, adapter: Adapter) -> Optional[dict[str, Any]]:
        """Which tokens the static scales assume stay exact (none: every token is in their range),
        for quantsink.json: an engine that quantizes them too clips them."""
        sinks = self.options.sinks
        if self.options.scales != "static" or sinks.method == "none":
            return None
        record: dict[str, Any] = {"method": sinks.method, "num_sinks": sinks.num_sinks, "at_inference": sinks.at_inference}
        if sinks.method == "pfn":
            record["tokens"] = f"the first {sinks.num_sinks} real tokens of each row"
        else:
            profile, options = adapter.model.__dict__[PREDICTOR_ATTRIBUTE]
            record["tokens"] = (f"each row's top {sinks.num_sinks} tokens by the kvsink score at the output of decoder "
                                f"block {profile.emergence_layer}, offered in forward-call order while the row has fewer")
            record["predictor"] = {"emergence_layer": profile.emergence_layer, "channels": profile.channels,
                                   "score": options.score, "threshold": profile.threshold}
        record["warning"] = ("the k_scale/v_scale were calibrated with these tokens left out of the range: an engine that "
                             "does not keep them exact quantizes them on that narrower grid and clips them")
        return record

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
        method.install(adapter)
        return method

    def compressed_tensors_kv_cache(self, adapter: Adapter) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]]:
        """compressed-tensors holds a scale of shape (1,) per attention (`tensor`), or
        (heads, 1, 1) (`attn_head`), under the attention's own name. Calibrated key ranges belong
        to quantsink's dynamic cache, which no kv_cache_scheme states: none (quantsink's state
        keeps them). Sinks kept exact are not in the format: a loader quantizes them with the
        rest (warned here, recorded in quantsink.json)."""
        if self.calibrates_key_ranges:
            return None, {}
        if self.options.sinks.method != "none" and self.options.sinks.at_inference == "exact":
            log.warning("kv_cache.sinks: the exported k_scale/v_scale leave the %s sinks out of their range and quantsink "
                        "keeps them exact; transformers, vLLM and other compressed-tensors loaders quantize them too, "
                        "clipped on that grid (quantsink.json, kv_cache_scales, says which tokens)", self.options.sinks.method)
        shape = (1,) if self.options.keys.granularity == "per_tensor" else (-1, 1, 1)
        names = {id(module): name for name, module in adapter.model.named_modules()}
        tensors = {}
        for block in range(adapter.num_blocks):
            attention = names[id(adapter.attention(block))]
            # clones: safetensors refuses tensors that share storage
            tensors[f"{attention}.k_scale"] = self.key_scales[block].reshape(shape).clone()
            tensors[f"{attention}.v_scale"] = self.value_scales[block].reshape(shape).clone()
        return self.options.compressed_tensors(), tensors
