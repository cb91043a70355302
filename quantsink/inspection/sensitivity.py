"""Per-layer sensitivity, one layer at a time, on a few calibration samples.

Linears: the recipe's quantizer restricted to one Linear (RegCache's trial quantizers,
quantsink.methods.regcache.trials), calibrated on the samples, scored as RegCache's search
scores a trial (1 - centred cosine of the embeddings to full precision). One calibration per
block serves all of its Linears. `A8` quantizes inputs only (what RegCache's l_q reads: a prefix
or a deletion changes activations, never weights), `W8A8` and `W4A8` weights and inputs.

KV cache (causal LMs): the cache quantizes one decoder layer's keys and values at a time (the
others exact), and the damage is the per-token KL of the next-token distributions to full
precision under the chunked-prefill protocol (quantsink.evaluate.compare_kv_caches); then all
layers at once with no sink kept, PFN-5 and the KVSink-predicted sinks, for the same text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from quantsink.evaluate import compare_kv_caches, embed_batches
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods.base import MethodContext
from quantsink.methods.regcache.trials import TrialQuantizers, damage
from quantsink.models.base import Adapter
from quantsink.recipe import QuantizationConfig, Recipe
from quantsink.registry import QUANTIZERS

# label -> (weight bits, or None for inputs only; activation bits)
LINEAR_CONFIGS: dict[str, tuple[Optional[int], int]] = {"A8": (None, 8), "W8A8": (8, 8), "W4A8": (4, 8)}
KV_BITS = (4, 2)
CHUNK_SIZE = 16
ALL = "all"  # the entry of every Linear quantized together


@dataclass
class LinearScan:
    """Damage per Linear (and under ALL, all of them together) for each configuration."""

    scores: dict[str, dict[str, float]]
    blocks: dict[str, int]  # the block of each scanned Linear
    samples: int


def quantization_config(base: QuantizationConfig, weight_bits: Optional[int], activation_bits: int) -> QuantizationConfig:
    weights = None if weight_bits is None else base.weights.model_copy(update={"bits": weight_bits})
    return base.model_copy(update={"weights": weights, "activations": base.activations.model_copy(update={"bits": activation_bits})})


@torch.no_grad()
def scan_linears(adapter: Adapter, base: QuantizationConfig, batches: list[dict[str, torch.Tensor]],
                 configs: dict[str, tuple[Optional[int], int]] = LINEAR_CONFIGS, progress: bool = True) -> LinearScan:
    reference = embed_batches(adapter, batches)
    block_names = adapter.block_names()
    scores: dict[str, dict[str, float]] = {}
    blocks: dict[str, int] = {}
    for label, (weight_bits, activation_bits) in configs.items():
        config = quantization_config(base, weight_bits, activation_bits)
        recipe = Recipe(quantization=config)
        trials = TrialQuantizers(MethodContext(adapter, recipe, batches, lambda: QUANTIZERS.get(config.backend)(config)))
        by_block = {block: [name for name in trials.targets if name.startswith(block_names[block] + ".")]
                    for block in range(len(block_names))}
        scores[label] = {}
        for block, names in tqdm(by_block.items(), desc=f"sensitivity {label}", unit="block", disable=not progress):
            if not names:
                continue
            with trials.on(names, weights=weight_bits is not None) as quantizer:
                _calibrate(adapter, quantizer, batches)
                for name in names:
                    with trials.only(name):
                        scores[label][name] = damage(reference, embed_batches(adapter, batches))[0]
                    blocks[name] = block
        with trials.on(trials.targets, weights=weight_bits is not None) as quantizer:
            _calibrate(adapter, quantizer, batches)
            scores[label][ALL] = damage(reference, embed_batches(adapter, batches))[0]
    return LinearScan(scores, blocks, sum(len(next(iter(batch.values()))) for batch in batches))


def _calibrate(adapter: Adapter, quantizer: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    with quantizer.calibrating(adapter.model):
        for batch in batches:
            adapter.embed(batch)
    quantizer.freeze(adapter.model)


def variant(scheme: KVCacheScheme, **changes: Any) -> KVCacheScheme:
    """`scheme` with `changes`, validated again (model_copy would not turn a dict into its model)."""
    return KVCacheScheme.model_validate({**scheme.model_dump(mode="json"), **changes})


def one_layer_cache(scheme: KVCacheScheme, layer: int, layers: int) -> SinkQuantizedCache:
    """A cache that quantizes decoder layer `layer` as `scheme` says and keeps the others exact:
    its layers are given up front, so none is replicated from the scheme."""
    cache = SinkQuantizedCache(scheme)
    cache.layers = [cache.layer_class_to_replicate() if index == layer else DynamicLayer() for index in range(layers)]
    return cache


def kl_of(adapter: Adapter, batches: list[dict[str, torch.Tensor]], make_cache) -> float:
    """Token-weighted mean KL over `batches`; `make_cache(batch)` builds each batch's empty cache."""
    total = tokens = 0.0
    for batch in batches:
        comparison = compare_kv_caches(adapter.model, batch["input_ids"], make_cache(batch), CHUNK_SIZE, batch["attention_mask"])
        total += comparison.kl_mean * comparison.tokens
        tokens += comparison.tokens
    return total / max(tokens, 1.0)


@torch.no_grad()
def scan_kv(adapter: Adapter, base: KVCacheScheme, batches: list[dict[str, torch.Tensor]],
            sink_positions: list[torch.Tensor], num_sinks: int, progress: bool = True) -> dict[str, Any]:
    """Per layer, the KL with only that layer's KV quantized at each of KV_BITS; and at each, all
    layers with no sinks, PFN-`num_sinks` and the predicted sinks (`sink_positions`, per batch
    (rows, k) cache positions)."""
    layers = adapter.num_blocks
    per_layer: dict[str, list[float]] = {}
    all_layers: dict[str, dict[str, float]] = {}
    for bits in KV_BITS:
        scheme = variant(base, bits=bits, sinks={"method": "none"})
        per_layer[str(bits)] = [kl_of(adapter, batches, lambda _batch, layer=layer: one_layer_cache(scheme, layer, layers))
                                for layer in tqdm(range(layers), desc=f"kv sensitivity {bits}-bit", unit="layer", disable=not progress)]
        pfn = variant(base, bits=bits, sinks={"method": "pfn", "num_sinks": num_sinks})
        predicted = variant(base, bits=bits, sinks={"method": "kvsink", "num_sinks": num_sinks})
        positions = iter(sink_positions)

        def with_predicted(_batch: dict[str, torch.Tensor]) -> SinkQuantizedCache:
            cache = SinkQuantizedCache(predicted)
            cache.set_sink_positions(next(positions))
            return cache

        all_layers[str(bits)] = {
            "none": kl_of(adapter, batches, lambda _batch: SinkQuantizedCache(scheme)),
            f"pfn-{num_sinks}": kl_of(adapter, batches, lambda _batch: SinkQuantizedCache(pfn)),
            f"kvsink-{num_sinks}": kl_of(adapter, batches, with_predicted),
        }
    return {"scheme": variant(base, sinks={"method": "none"}).describe(), "chunk_size": CHUNK_SIZE,
            "per_layer_kl": per_layer, "all_layers_kl": all_layers,
            "samples": sum(len(batch["input_ids"]) for batch in batches)}
