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
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from quantsink.kv.arithmetic import fake_quantize_signed_grid
from quantsink.errors import CheckpointError
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


@METHODS.register("kv-static")
class KVStatic(Method):
    name = "kv-static"
    options_model = KVCacheScheme
    requires = (KVCacheHost,)

    def __init__(self, options: KVCacheScheme):
        super().__init__(options)
        self.key_scales: torch.Tensor | None = None  # (blocks, groups)
        self.value_scales: torch.Tensor | None = None

    def apply(self, context: MethodContext) -> dict[str, Any]:
        self.key_scales, self.value_scales = calibrate(context.adapter, context.calibration_batches, self.options, context.progress)
        install(context.adapter, self.key_scales, self.value_scales, self.options.bits)
        largest = qrange(self.options.bits, symmetric=True)[1]
        return {
            "scheme": self.options.describe(),
            "key_absmax": (self.key_scales.amax(dim=1) * largest).tolist(),
            "value_absmax": (self.value_scales.amax(dim=1) * largest).tolist(),
        }

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"options": self.options.model_dump(mode="json")}, {"key_scales": self.key_scales, "value_scales": self.value_scales}

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "KVStatic":
        try:
            method = cls(KVCacheScheme.model_validate(state["options"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the kv-static state is malformed ({error}): quantize the model again") from None
        if method.options.scales != "static":
            raise CheckpointError("the kv-static state holds a scheme with dynamic scales: quantize the model again")
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

    def compressed_tensors_kv_cache(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """compressed-tensors holds a scale of shape (1,) per attention (`tensor`), or
        (heads, 1, 1) (`attn_head`), under the attention's own name."""
        shape = (1,) if self.options.keys.granularity == "per_tensor" else (-1, 1, 1)
        names = {id(module): name for name, module in adapter.model.named_modules()}
        tensors = {}
        for block in range(adapter.num_blocks):
            attention = names[id(adapter.attention(block))]
            # clones: safetensors refuses tensors that share storage
            tensors[f"{attention}.k_scale"] = self.key_scales[block].reshape(shape).clone()
            tensors[f"{attention}.v_scale"] = self.value_scales[block].reshape(shape).clone()
        return self.options.compressed_tensors(), tensors
