"""The Python API: `quantize(model, recipe)` -> `QuantizationResult`, and `load(folder)`."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from quantsink import export
from quantsink.calibration import ActivationStats, StatisticsCollector
from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.evaluate import embed_batches, fidelity
from quantsink.models import resolve
from quantsink.models.base import Adapter
from quantsink.quantizers.base import Quantizer
from quantsink.recipe import Recipe
from quantsink.methods.base import Method, MethodContext
from quantsink.registry import METHODS, QUANTIZERS

log = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    adapter: Adapter
    recipe: Recipe
    quantizer: Quantizer
    methods: list[Method]
    stats: ActivationStats
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
    adapter = resolve(spec)
    settings = recipe.calibration
    samples = load_samples(settings.data, adapter.modality, settings.num_samples, settings.holdout, settings.seed, settings.seq_len)
    holdout_inputs = [adapter.preprocess(batch) for batch in batched(samples.holdout, settings.batch_size)]
    calibration_inputs = [adapter.preprocess(batch) for batch in batched(samples.calibration, settings.batch_size)]
    reference = embed_batches(adapter, holdout_inputs)

    def make_quantizer() -> Quantizer:
        return QUANTIZERS.get(recipe.quantization.backend)(recipe.quantization)

    context = MethodContext(adapter, recipe, calibration_inputs, make_quantizer, progress)
    methods = [METHODS.get(name)(METHODS.get(name).validate_options(options))
               for entry in recipe.methods for name, options in entry.items()]
    method_reports = {method.name: method.apply(context) for method in methods}

    quantizer = make_quantizer()
    targets = quantizer.prepare(adapter.model)
    collector = StatisticsCollector(adapter, {name: adapter.model.get_submodule(name) for name in targets})
    started = time.perf_counter()
    with collector.attached(), quantizer.calibrating(adapter.model):
        for inputs in tqdm(calibration_inputs, desc="calibrating", unit="batch", disable=not progress):
            collector.run(inputs)
    calibration_seconds = time.perf_counter() - started
    quantizer.freeze(adapter.model)
    stats = collector.result()

    report = {
        "model": adapter.source.spec,
        "family": adapter.source.family,
        "recipe": recipe.name,
        "calibration": {
            "data": samples.description,
            "calibration_samples": len(samples.calibration),
            "holdout_samples": len(samples.holdout),
            "seconds": calibration_seconds,
        },
        "quantized_modules": len(targets),
        "methods": method_reports,
        "fidelity": fidelity(reference, embed_batches(adapter, holdout_inputs)),
        "outliers": stats.summary(),
    }
    log.info("holdout cosine %.4f (min %.4f)", report["fidelity"]["cosine_mean"], report["fidelity"]["cosine_min"])
    return QuantizationResult(adapter=adapter, recipe=recipe, quantizer=quantizer, methods=methods, stats=stats, report=report)


def with_overrides(recipe: Recipe, data: Optional[str], num_samples: Optional[int], seed: Optional[int]) -> Recipe:
    overrides = {key: value for key, value in (("data", data), ("num_samples", num_samples), ("seed", seed)) if value is not None}
    if not overrides:
        return recipe
    return Recipe.from_dict({**recipe.to_dict(), "calibration": {**recipe.calibration.model_dump(), **overrides}}, origin="recipe with command-line overrides")


load = export.load
