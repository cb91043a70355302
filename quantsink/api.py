"""The Python API: `quantize(model, recipe)` -> `QuantizationResult`, `load(folder)`, and for
causal LMs `kv_cache(model)` (a fresh cache as the recipe's kv_cache section says) and
`evaluate_kv_cache(...)` (what `quantsink eval` prints)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from quantsink import export, io
from quantsink.calibration import ActivationStats, StatisticsCollector
from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.evaluate import KVComparison, compare_kv_caches, embed_batches, fidelity
from quantsink.kv.attach import attach_kv_cache, build_kv_cache, kv_cache_scheme_of, require_kv_cache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.kv.storage import KVMemory
from quantsink.models import resolve
from quantsink.models.base import Adapter
from quantsink.models.probe import require_modules_run, require_runs, tallied_modules
from quantsink.quantizers.base import Quantizer
from quantsink.recipe import Recipe
from quantsink.methods.base import Method, MethodContext, require_capabilities
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS

log = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """`quantizer` and `stats` are None when the recipe quantizes only the KV cache."""

    adapter: Adapter
    recipe: Recipe
    quantizer: Optional[Quantizer]
    methods: list[Method]
    stats: Optional[ActivationStats]
    report: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def save(self, destination: str | os.PathLike) -> Path:
        return export.save(self, destination)


def quantize(
    model: str | nn.Module | None,
    recipe: Recipe | dict | str | os.PathLike,
    calibration: Optional[str] = None,
    *,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize `model` (a spec string, an nn.Module, or None for the recipe's `model`) as the
    recipe says. An nn.Module is quantized in place. `calibration`, `num_samples` and `seed`
    override the recipe's calibration section."""
    recipe = with_overrides(Recipe.coerce(recipe), calibration, num_samples, seed)
    spec = model if model is not None else recipe.model
    if spec is None:
        raise UserError("no model given: pass MODEL or set 'model:' in the recipe")
    methods = [METHODS.get(name)(METHODS.get(name).validate_options(options)) for name, options in recipe.method_entries()]
    if recipe.quantization is not None:
        # refuse an export that cannot hold this quantization before any calibration is spent on it
        problem = EXPORT_FORMATS.get(recipe.export.format).check(recipe.quantization)
        if problem is not None:
            raise UserError(problem)
    adapter = resolve(spec)
    if recipe.kv_cache is not None:
        # static scales are calibrated by the kv-static method, named as it is in the folder
        require_kv_cache(adapter, "kv-static" if recipe.kv_cache.scales == "static" else "a kv_cache recipe")
    for method in methods:
        require_capabilities(method, adapter)
    settings = recipe.calibration
    samples = load_samples(settings.data, adapter.modality, settings.num_samples, settings.holdout, settings.seed, settings.seq_len)
    holdout_inputs = preprocess_all(adapter, samples.holdout, settings.batch_size, settings.seq_len)
    calibration_inputs = preprocess_all(adapter, samples.calibration, settings.batch_size, settings.seq_len)
    # static KV scales go into the model as weights do: measured as the model's fidelity
    static_kv = recipe.kv_cache is not None and recipe.kv_cache.scales == "static"
    reference = embed_batches(adapter, holdout_inputs) if recipe.quantization is not None or static_kv else None

    def make_quantizer() -> Quantizer:
        return QUANTIZERS.get(recipe.quantization.backend)(recipe.quantization)

    context = MethodContext(adapter, recipe, calibration_inputs, make_quantizer, progress)
    method_reports = {method.name: method.apply(context) for method in methods}
    report: dict[str, Any] = {
        "model": adapter.source.spec,
        "family": adapter.source.family,
        "recipe": recipe.name,
        "calibration": {
            "data": samples.description,
            "calibration_samples": len(samples.calibration),
            "holdout_samples": len(samples.holdout),
        },
        "methods": method_reports,
    }

    quantizer, stats = None, None
    if recipe.quantization is not None:
        quantizer = make_quantizer()
        targets = quantizer.prepare(adapter.model)
        collector = StatisticsCollector(adapter, {name: adapter.model.get_submodule(name) for name in targets})
        started = time.perf_counter()

        def calibrate() -> None:
            for inputs in tqdm(calibration_inputs, desc="calibrating", unit="batch", disable=not progress):
                collector.run(inputs)

        with collector.attached(), quantizer.calibrating(adapter.model), tallied_modules(adapter.model, targets) as tallies:
            require_runs(adapter.model, tallies, calibrate, during="the calibration pass",
                         fix="the model never calls it; add it to quantization.ignore")
        report["calibration"]["seconds"] = time.perf_counter() - started
        quantizer.freeze(adapter.model)
        require_modules_run(adapter, targets)
        stats = collector.result()
        report["quantized_modules"] = len(targets)
        report.update(quantizer.runtime(adapter.model))
        report["outliers"] = stats.summary()
    if reference is not None:
        report["fidelity"] = fidelity(reference, embed_batches(adapter, holdout_inputs))
        log.info("holdout cosine %.4f (min %.4f)", report["fidelity"]["cosine_mean"], report["fidelity"]["cosine_min"])
    if recipe.kv_cache is not None:
        attach_kv_cache(adapter, recipe.kv_cache)
        if not static_kv:
            report["kv_cache"] = kv_cache_fidelity(adapter, holdout_inputs, recipe.kv_cache, progress=progress)
    return QuantizationResult(adapter=adapter, recipe=recipe, quantizer=quantizer, methods=methods, stats=stats, report=report)




def preprocess_all(adapter: Adapter, samples: list[Any], batch_size: int, max_length: Optional[int]) -> list[dict[str, Any]]:
    return [adapter.preprocess(batch, max_length=max_length) for batch in batched(samples, batch_size)]


def with_overrides(recipe: Recipe, data: Optional[str], num_samples: Optional[int], seed: Optional[int]) -> Recipe:
    overrides = {key: value for key, value in (("data", data), ("num_samples", num_samples), ("seed", seed)) if value is not None}
    if not overrides:
        return recipe
    return Recipe.from_dict({**recipe.to_dict(), "calibration": {**recipe.calibration.model_dump(), **overrides}}, origin="recipe with command-line overrides")


load = export.load


def kv_cache(model: nn.Module | QuantizationResult) -> Cache:
    """A fresh, empty KV cache for `model` (from `quantsink.load(OUT)` or `quantize(...)`) as its
    recipe's kv_cache section says; pass it to `generate` or a forward call as `past_key_values=`
    (`cache=` from transformers 5.24)."""
    module = model.model if isinstance(model, QuantizationResult) else model
    return build_kv_cache(kv_cache_scheme_of(module), resolve(module))


def kv_cache_fidelity(
    adapter: Adapter, batches: list[dict[str, Any]], scheme: KVCacheScheme, chunk_size: int = 16, progress: bool = True
) -> dict[str, Any]:
    """Perplexity with the full-precision cache and with the quantized one, and the per-token KL
    between their next-token distributions, over `batches` fed through both caches in chunks of
    `chunk_size` tokens; plus what the quantized cache costs per token."""
    if scheme.scales == "static":
        raise UserError(
            "kv_cache.scales is static: the model quantizes its own keys and values, so a full-precision cache "
            "compares with nothing; its fidelity is in OUT/report.json (fidelity), written by quantsink quantize"
        )
    comparisons, memories = [], []
    for inputs in tqdm(batches, desc="kv cache eval", unit="batch", disable=not progress):
        cache = build_kv_cache(scheme, adapter)
        comparisons.append(compare_kv_caches(adapter.model, inputs["input_ids"], cache, chunk_size, inputs.get("attention_mask")))
        if isinstance(cache, SinkQuantizedCache):  # other backends do not account for their storage
            memories.append(cache.memory())
    comparison = KVComparison.combine(comparisons)
    memory = KVMemory.sum(memories) if memories else None
    return {
        "scheme": scheme.describe(),
        "chunk_size": chunk_size,
        "tokens": comparison.tokens,
        "perplexity_reference": comparison.perplexity_reference,
        "perplexity_quantized": comparison.perplexity_quantized,
        "kl_mean": comparison.kl_mean,
        "bytes_per_token": memory.bytes_per_token if memory is not None and memory.tokens else float("nan"),
        "compression": memory.compression if memory is not None and memory.total else float("nan"),
    }


def evaluate_kv_cache(
    folder: str | os.PathLike,
    text: Optional[str] = None,
    chunk_size: int = 16,
    num_samples: Optional[int] = None,
    progress: bool = True,
    write: bool = False,
) -> dict[str, Any]:
    """`quantsink eval OUT`: the KV-cache fidelity of a folder quantsink wrote, on `text` (a file
    or folder; by default the held-out part of the recipe's calibration data). `write` also saves
    it as OUT/eval.json."""
    folder = Path(folder)
    adapter = export.load_adapter(folder)
    scheme = kv_cache_scheme_of(adapter.model)
    recipe = Recipe.from_dict(io.read_manifest(folder)["recipe"], origin=str(folder / io.MANIFEST))
    settings = recipe.calibration
    if text is None:
        count = num_samples or settings.holdout
        samples = load_samples(settings.data, "text", settings.num_samples, count, settings.seed, settings.seq_len).holdout
        source = f"{settings.data} (held out from calibration)"
    else:
        samples = load_samples(text, "text", num_samples or settings.holdout, 0, settings.seed, settings.seq_len).calibration
        source = text
    batches = preprocess_all(adapter, samples, settings.batch_size, settings.seq_len)
    result = {"text": source, "samples": len(samples), **kv_cache_fidelity(adapter, batches, scheme, chunk_size, progress)}
    if write:
        io.write_json_atomically(folder / "eval.json", result)
    return result
