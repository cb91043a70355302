"""The stages of `quantize`, each a function with explicit inputs and outputs:

    plan      recipe -> the methods it names (and an export format that can hold it)
    load      spec -> Adapter, checked for what the recipe's methods and KV cache need
    data      adapter, calibration settings -> Splits (preprocessed calibration and holdout batches)
    methods   the methods applied to the model -> their reports
    calibrate quantizer, batches -> Calibration (the targets, every one proven to run; ActivationStats)
    quantize  freeze -> the quantized model, proven to run by a probe forward
    evaluate  holdout embeddings before and after -> fidelity; a KV cache's perplexity and KL
    export    Artifact -> the output folder (quantsink.exports.folder)

`run` composes them into the Artifact that every export reads."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from quantsink import distributed
from quantsink.calibration import ActivationStats, StatisticsCollector
from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.evaluate import KVComparison, compare_kv_caches, embed_batches, fidelity
from quantsink.exports import folder
from quantsink.exports.base import Artifact
from quantsink.kv.attach import attach_kv_cache, build_kv_cache, require_kv_cache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.kv.storage import KVMemory
from quantsink.methods.base import Method, MethodContext, require_capabilities
from quantsink.models import Placement, resolve
from quantsink.models.base import Adapter, on_device
from quantsink.models.probe import require_modules_run, require_runs, tallied_modules
from quantsink.quantizers.base import Quantizer
from quantsink.recipe import CalibrationConfig, ExecutionConfig, QuantizationConfig, Recipe
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS
from quantsink.models.streaming import host_blocks, make_resident
from quantsink.sequential import IN_MEMORY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """Preprocessed batches of the calibration and holdout samples, and where they came from."""

    calibration: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    description: str
    calibration_samples: int
    holdout_samples: int


@dataclass(frozen=True)
class Calibration:
    """What the calibration pass leaves: the targeted modules and the activation statistics."""

    targets: list[str]
    stats: ActivationStats
    seconds: float


def plan(recipe: Recipe) -> list[Method]:
    """The recipe's methods, after refusing an export that cannot hold its quantization: before
    any calibration is spent on it."""
    methods = [METHODS.get(name)(METHODS.get(name).validate_options(options)) for name, options in recipe.method_entries()]
    if recipe.quantization is not None:
        problem = EXPORT_FORMATS.get(recipe.export.format).incompatibility(recipe.quantization)
        if problem is not None:
            raise UserError(problem)
        config = recipe.quantization
        static = config.activations is not None and not config.activations.dynamic
        if static and distributed.world_size() > 1 and not QUANTIZERS.get(config.backend).merges_input_statistics:
            raise UserError(
                f"quantization.backend {config.backend} keeps its own input statistics, which cannot be merged across "
                f"{distributed.world_size()} ranks exactly: calibrate in one process or use backend fake, int8 or torchao"
            )
    return methods


def load(spec: str | nn.Module, recipe: Recipe, methods: list[Method]) -> Adapter:
    """The model, placed as execution says: in_memory, all of it on the device (or over the
    devices accelerate picks, device_map auto); sequential, its blocks on the CPU (or on disk,
    offload_dir) and the rest on the device, each block coming for its turn."""
    execution = recipe.execution
    device = distributed.device_for(execution.device)  # a device this machine lacks: refused before loading
    if execution.device_map is not None and distributed.launched():
        raise UserError("execution.device_map auto spreads one model over every GPU, and torchrun runs one model per rank "
                        "on a GPU of its own: drop device_map, or run in one process")
    if execution.offload_dir is not None:
        refuse_streaming(recipe, methods)
        adapter = resolve(spec, stream_weights=True, placement=Placement(str(device)))
    elif execution.pipeline == "sequential":
        adapter = resolve(spec)
        host_blocks(adapter, device)
    else:
        adapter = resolve(spec, placement=Placement(str(device), execution.device_map, execution.max_memory))
    if recipe.kv_cache is not None:
        # static scales are calibrated by the kv-static method, named as it is in the folder
        require_kv_cache(adapter, "kv-static" if recipe.kv_cache.scales == "static" else "a kv_cache recipe")
    for method in methods:
        require_capabilities(method, adapter)
    return adapter


def execution_report(adapter: Adapter, execution: ExecutionConfig) -> dict[str, Any]:
    """How the calibration ran: the pipeline, the device it ran on (this rank's, under torchrun)
    and, with device_map auto, where accelerate put each module."""
    report: dict[str, Any] = {"pipeline": execution.pipeline, "device": str(adapter.input_device)}
    if execution.device_map is not None:
        # accelerate records its map when it spreads the model, not when one device holds all of it
        placed = getattr(adapter.model, "hf_device_map", None) or {"": report["device"]}
        report["device_map"] = {name: str(where) for name, where in placed.items()}
    return report


@contextlib.contextmanager
def dispatch_hooks_kept(model: nn.Module) -> Iterator[None]:
    """accelerate's device hooks (device_map auto over several devices) live on module objects:
    a module the quantizer replaces (a Linear by its quantized self) gets its predecessor's hook
    again, so that its inputs still move to the device its weights are on."""
    hooked = {name: module._hf_hook for name, module in model.named_modules() if hasattr(module, "_hf_hook")}
    yield
    if not hooked:
        return
    from accelerate.hooks import add_hook_to_module

    for name, hook in hooked.items():
        module = model.get_submodule(name)
        if not hasattr(module, "_hf_hook"):
            add_hook_to_module(module, hook)


def refuse_streaming(recipe: Recipe, methods: list[Method]) -> None:
    """What cannot run with the block weights on disk, refused before anything loads: a block
    goes back to disk after each call, so a write into its weights before it comes back for good
    would be lost."""
    where = f"with the weights streamed from disk (execution.offload_dir {recipe.execution.offload_dir})"
    for method in methods:
        if method.writes_weights:
            raise UserError(f"{method.name} writes the model's weights, which {where} go back to disk unchanged after each "
                            "block: drop offload_dir (keep pipeline: sequential for the block inputs) or the method")
    if recipe.quantization is not None and not QUANTIZERS.get(recipe.quantization.backend).freezes_by_block:
        raise UserError(f"quantization.backend {recipe.quantization.backend} quantizes the whole model at once, and {where} "
                        "each block is quantized as it comes back from disk: use backend fake or int8, or drop offload_dir")


def preprocess_all(adapter: Adapter, samples: list[Any], batch_size: int, max_length: Optional[int]) -> list[dict[str, Any]]:
    """`samples` as batches of model inputs, on the device the model takes them on."""
    return [on_device(adapter.preprocess(batch, max_length=max_length), adapter.input_device)
            for batch in batched(samples, batch_size)]


def data(adapter: Adapter, settings: CalibrationConfig) -> Splits:
    samples = load_samples(settings.data, adapter.modality, settings.num_samples, settings.holdout, settings.seed, settings.seq_len)
    return Splits(
        calibration=preprocess_all(adapter, samples.calibration, settings.batch_size, settings.seq_len),
        holdout=preprocess_all(adapter, samples.holdout, settings.batch_size, settings.seq_len),
        description=samples.description,
        calibration_samples=len(samples.calibration),
        holdout_samples=len(samples.holdout),
    )


def run_methods(context: MethodContext, methods: list[Method]) -> dict[str, Any]:
    return {method.name: method.apply(context) for method in methods}


def calibrate(adapter: Adapter, quantizer: Quantizer, batches: list[dict[str, Any]], progress: bool = True,
              execution: ExecutionConfig = IN_MEMORY) -> Calibration:
    """Prepare the quantizer's targets and run the calibration pass as `execution` says; the pass
    must reach each target. Under torchrun each rank runs its shard of `batches`, and the
    statistics and input observers are merged in rank order: every rank ends with what one
    process calibrated on all of `batches` ends with (quantsink.distributed)."""
    with dispatch_hooks_kept(adapter.model):
        targets = quantizer.prepare(adapter.model)
    collector = StatisticsCollector(adapter)
    shard = distributed.shard(batches)
    started = time.perf_counter()

    def calibration_pass() -> None:
        collector.collect(shard, execution, watched=targets, progress=progress)

    with collector.attached(), quantizer.calibrating(adapter.model), tallied_modules(adapter.model, targets) as tallies:
        require_runs(adapter.model, tallies, calibration_pass, during="the calibration pass",
                     fix="the model never calls it; add it to quantization.ignore")
        if distributed.world_size() > 1:  # every rank's input observers hold all ranks' batches before a scale is set
            observers = quantizer.input_observers(adapter.model, targets)
            parts = distributed.gather({name: observer.accumulated() for name, observer in observers.items()})
            for name, observer in observers.items():
                observer.absorb([rank_parts[name] for rank_parts in parts])
    stats = collector.result()
    if distributed.world_size() > 1:
        parts = distributed.gather((stats.token_linf, stats.channel_absmax), stats.channel_absmax[0].device)
        stats = ActivationStats.merged([ActivationStats(stats.block_names, token_linf, channel_absmax)
                                        for token_linf, channel_absmax in parts])
    return Calibration(targets=targets, stats=stats, seconds=time.perf_counter() - started)


def quantize(adapter: Adapter, quantizer: Quantizer, calibration: Calibration) -> dict[str, Any]:
    """Freeze the calibrated targets, prove a probe forward reaches them; their report entries."""
    with dispatch_hooks_kept(adapter.model):
        quantizer.freeze(adapter.model)
    require_modules_run(adapter, calibration.targets)
    return {"quantized_modules": len(calibration.targets), **quantizer.runtime(adapter.model), "outliers": calibration.stats.summary()}


def quantize_as_recipe(adapter: Adapter, config: QuantizationConfig, batches: list[dict[str, Any]]) -> Quantizer:
    """`config`'s quantizer on `adapter`'s model as `run` applies it after the methods: prepared,
    calibrated on `batches`, frozen (for ablations that install a method by hand)."""
    quantizer = QUANTIZERS.get(config.backend)(config)
    quantize(adapter, quantizer, calibrate(adapter, quantizer, batches, progress=False))
    return quantizer


def evaluate(adapter: Adapter, reference: Any, holdout: list[dict[str, Any]]) -> dict[str, Any]:
    """The fidelity of the model's holdout embeddings to `reference`, those of full precision."""
    result = fidelity(reference, embed_batches(adapter, holdout))
    log.info("holdout cosine %.4f (min %.4f)", result["cosine_mean"], result["cosine_min"])
    return result


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


def export(artifact: Artifact, destination: str | Path) -> Path:
    return folder.save(artifact, destination)


def run(spec: str | nn.Module, recipe: Recipe, progress: bool = True) -> tuple[Artifact, Optional[ActivationStats]]:
    """Every stage up to export, in order: the artifact, and the activation statistics when the
    recipe quantizes Linears."""
    methods = plan(recipe)
    adapter = load(spec, recipe, methods)
    splits = data(adapter, recipe.calibration)
    # static KV scales go into the model as weights do: measured as the model's fidelity
    static_kv = recipe.kv_cache is not None and recipe.kv_cache.scales == "static"
    # under torchrun rank 0 alone evaluates (the others' results are the same and never written);
    # a set too small to shard is refused first, by every rank alike, before rank 0 works alone
    distributed.require_shards(len(splits.calibration))
    evaluated = (recipe.quantization is not None or static_kv) and distributed.is_main()
    reference = embed_batches(adapter, splits.holdout) if evaluated else None

    def make_quantizer() -> Quantizer:
        return QUANTIZERS.get(recipe.quantization.backend)(recipe.quantization)

    report: dict[str, Any] = {
        "model": adapter.source.spec,
        "family": adapter.source.family,
        "recipe": recipe.name,
        "calibration": {
            "data": splits.description,
            "calibration_samples": splits.calibration_samples,
            "holdout_samples": splits.holdout_samples,
        },
        "execution": execution_report(adapter, recipe.execution),
        "methods": run_methods(MethodContext(adapter, recipe, splits.calibration, make_quantizer, progress), methods),
    }
    quantizer, stats = None, None
    if recipe.quantization is not None:
        quantizer = make_quantizer()
        calibration = calibrate(adapter, quantizer, splits.calibration, progress, recipe.execution)
        # weights streamed from disk: each block comes back for good and is quantized as it does,
        # one float block resident at a time (the export writes one file)
        make_resident(adapter, quantizer.freeze)
        report["calibration"]["seconds"] = calibration.seconds
        for entry in report["methods"].values():
            if "cost" in entry:  # a method's measured cost, in units of this calibration pass
                entry["cost"]["calibration_passes"] = entry["cost"]["seconds"] / calibration.seconds
        report.update(quantize(adapter, quantizer, calibration))
        stats = calibration.stats
    if reference is not None:
        report["fidelity"] = evaluate(adapter, reference, splits.holdout)
    if recipe.kv_cache is not None:
        attach_kv_cache(adapter, recipe.kv_cache)
        if not static_kv and distributed.is_main():
            report["kv_cache"] = kv_cache_fidelity(adapter, splits.holdout, recipe.kv_cache, progress=progress)
    make_resident(adapter)
    return Artifact(adapter=adapter, recipe=recipe, quantizer=quantizer, methods=tuple(methods), report=report), stats
