"""The Python API: `quantize(model, recipe)` -> `QuantizationResult`, `load(folder)`, and for
causal LMs `kv_cache(model)` (a fresh cache as the recipe's kv_cache section says) and
`evaluate_kv_cache(...)` (what `quantsink eval` prints)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers.cache_utils import Cache

from quantsink import distributed, io, pipeline
from quantsink.calibration import ActivationStats
from quantsink.data import load_samples
from quantsink.errors import UserError
from quantsink.exports import folder as exports_folder
from quantsink.exports.base import Artifact
from quantsink.kv.attach import build_kv_cache, kv_cache_scheme_of
from quantsink.methods.base import Method
from quantsink.models import resolve
from quantsink.models.base import Adapter
from quantsink.quantizers.base import Quantizer
from quantsink.recipe import Recipe


@dataclass(frozen=True)
class QuantizationResult:
    """The pipeline's artifact and the activation statistics of its calibration pass;
    `quantizer` and `stats` are None when the recipe quantizes only the KV cache."""

    artifact: Artifact
    stats: Optional[ActivationStats]

    @property
    def adapter(self) -> Adapter:
        return self.artifact.adapter

    @property
    def recipe(self) -> Recipe:
        return self.artifact.recipe

    @property
    def quantizer(self) -> Optional[Quantizer]:
        return self.artifact.quantizer

    @property
    def methods(self) -> tuple[Method, ...]:
        return self.artifact.methods

    @property
    def report(self) -> dict[str, Any]:
        return self.artifact.report

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def save(self, destination: str | os.PathLike) -> Path:
        """Write the output folder; under torchrun rank 0 alone writes it (every rank holds the
        same result) and the others return its path."""
        if not distributed.is_main():
            return Path(destination)
        return pipeline.export(self.artifact, destination)


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
    recipe says, through the stages of quantsink.pipeline. An nn.Module is quantized in place.
    `calibration`, `num_samples` and `seed` override the recipe's calibration section.

    Launched by torchrun with several ranks, each rank calibrates its shard of the calibration
    set and every rank ends with the single-process model and method state
    (quantsink.distributed); rank 0 alone shows progress and evaluates on the holdout, so only
    its report holds the fidelity."""
    recipe = with_overrides(Recipe.coerce(recipe), calibration, num_samples, seed)
    spec = model if model is not None else recipe.model
    if spec is None:
        raise UserError("no model given: pass MODEL or set 'model:' in the recipe")
    distributed.initialize(recipe.execution.device)
    artifact, stats = pipeline.run(spec, recipe, progress and distributed.is_main())
    return QuantizationResult(artifact, stats)


def with_overrides(recipe: Recipe, data: Optional[str], num_samples: Optional[int], seed: Optional[int]) -> Recipe:
    overrides = {key: value for key, value in (("data", data), ("num_samples", num_samples), ("seed", seed)) if value is not None}
    if not overrides:
        return recipe
    return Recipe.from_dict({**recipe.to_dict(), "calibration": {**recipe.calibration.model_dump(), **overrides}}, origin="recipe with command-line overrides")


load = exports_folder.load


def kv_cache(model: nn.Module | QuantizationResult) -> Cache:
    """A fresh, empty KV cache for `model` (from `quantsink.load(OUT)` or `quantize(...)`) as its
    recipe's kv_cache section says; pass it to `generate` or a forward call as `past_key_values=`
    (`cache=` from transformers 5.24)."""
    module = model.model if isinstance(model, QuantizationResult) else model
    return build_kv_cache(kv_cache_scheme_of(module), resolve(module))


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
    adapter = exports_folder.load_adapter(folder)
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
    batches = pipeline.preprocess_all(adapter, samples, settings.batch_size, settings.seq_len)
    result = {"text": source, "samples": len(samples), **pipeline.kv_cache_fidelity(adapter, batches, scheme, chunk_size, progress)}
    if write:
        io.write_json_atomically(folder / "eval.json", result)
    return result
