"""The output folder: writing an artifact in its recipe's export format, and loading it back.

A folder holds `model.safetensors` (the quantized model's state, laid out by the format),
`quantsink.json` (format version, model source, recipe, quantizer state: what is needed to
rebuild the modules before loading the tensors; `kv_cache_scales`, for static KV scales
calibrated without the sinks, which tokens they assume stay exact), `report.json` and
`recipe.yaml`, and `report.md` with the figures of what the report measured."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

from pydantic import ValidationError
from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, UserError
from quantsink.exports.base import Artifact
from quantsink.inspection.report import write_quantize_report
from quantsink.kv.attach import attach_kv_cache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods.base import require_capabilities
from quantsink.models import rebuild
from quantsink.models.base import Adapter, ModelSource
from quantsink.models.probe import require_modules_run
from quantsink.recipe import QuantizationConfig, describe_validation_error
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS

log = logging.getLogger(__name__)

# Tensors of the methods (e.g. RegCache's registers), kept apart from the model's own state.
METHOD_TENSORS = "methods.safetensors"


@runtime_checkable
class AssumesExactTokens(Protocol):
    """A method whose exported scales were calibrated with some tokens left out of their range."""

    def exact_tokens(self, adapter: Adapter) -> Optional[dict[str, Any]]:
        """Which tokens, how they are found, and what a loader that quantizes them gets; None if none."""


def exact_tokens(artifact: Artifact) -> Optional[dict[str, Any]]:
    records = [record for method in artifact.methods if isinstance(method, AssumesExactTokens)
               if (record := method.exact_tokens(artifact.adapter)) is not None]
    return records[0] if records else None


def save(artifact: Artifact, destination: str | Path) -> Path:
    destination = Path(destination)
    export_format = EXPORT_FORMATS.get(artifact.recipe.export.format)
    if artifact.quantizer is None and export_format.writes.integer_layers:
        raise UserError(
            f"export.format {export_format.name} packs quantized weights, and the recipe quantizes only the KV cache: "
            "use export.format fake-quant (the weights stay as they are) or add a quantization section"
        )
    with io.atomic_output_dir(destination) as staging:
        format_details = export_format.write(artifact, staging)
        artifact.adapter.save_assets(staging)
        method_states, method_tensors = [], {}
        for method in artifact.methods:
            state, tensors = method.state()
            method_states.append({"name": method.name, "state": state})
            method_tensors.update({f"{method.name}/{key}": tensor for key, tensor in tensors.items()})
        if method_tensors:
            io.save_tensors(method_tensors, staging / METHOD_TENSORS)
        quantization = artifact.recipe.quantization
        kv_cache_scales = exact_tokens(artifact)
        io.write_json(
            staging / io.MANIFEST,
            {
                "format_version": io.FORMAT_VERSION,
                "export_format": artifact.recipe.export.format,
                "source": artifact.adapter.source.to_dict(),
                "recipe": artifact.recipe.to_dict(),
                "methods": method_states,
                "quantization": None if artifact.quantizer is None else {
                    "backend": quantization.backend,
                    "config": quantization.model_dump(mode="json"),
                    "state": artifact.quantizer.state(artifact.model),
                    **format_details,
                },
                **({"kv_cache_scales": {"exact_tokens": kv_cache_scales}} if kv_cache_scales else {}),
            },
        )
        io.write_json(staging / "report.json", artifact.report)
        write_quantize_report(artifact.report, staging)  # report.md and its figures, from the report alone
        (staging / "recipe.yaml").write_text(artifact.recipe.to_yaml())
    log.info("wrote %s", destination)
    return destination


def load_adapter(folder: str | Path) -> Adapter:
    """The quantized model of a folder quantsink wrote, inside its family's adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the -o folder that 'quantsink quantize' wrote")
    manifest = io.read_manifest(folder)
    try:
        source = ModelSource.from_dict(manifest["source"])
        quantization = manifest["quantization"]
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / io.MANIFEST} lacks {error}: re-export the folder") from None
    try:
        adapter = rebuild(source, assets_dir=folder)
    except UserError as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: {error}") from None
    restore_methods(adapter, manifest.get("methods", []), folder)
    kv_section = (manifest.get("recipe") or {}).get("kv_cache")
    if kv_section is not None:
        try:
            attach_kv_cache(adapter, KVCacheScheme.model_validate(kv_section))
        except ValidationError as error:
            raise CheckpointError(f"{folder / io.MANIFEST}: recipe.kv_cache.{describe_validation_error(error)}; re-export the folder") from None
    quantizer = None
    try:
        if quantization is not None:
            config = QuantizationConfig.model_validate(quantization["config"])
            quantizer = QUANTIZERS.get(quantization["backend"])(config)
            quantizer.restore(adapter.model, quantization["state"])
        export_format = EXPORT_FORMATS.get(manifest.get("export_format", "fake-quant"))
    except ValidationError as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: quantization.config.{describe_validation_error(error)}; re-export the folder") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: malformed quantization section ({type(error).__name__}: {error}); re-export the folder") from None
    except CheckpointError:
        raise
    except UserError as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: {error}") from None
    io.load_state_into(adapter.model, export_format.read(folder, quantizer, adapter.model, manifest), folder / io.WEIGHTS)
    adapter.model.eval()
    if quantization is not None:
        require_modules_run(adapter, list(quantization["state"]["modules"]))
    return adapter


def restore_methods(adapter: Adapter, method_states: list[dict[str, Any]], folder: Path) -> None:
    tensors = io.load_tensors(folder / METHOD_TENSORS) if method_states and (folder / METHOD_TENSORS).exists() else {}
    for entry in method_states:
        try:
            method = METHODS.get(entry["name"])
        except UserError as error:
            raise CheckpointError(f"{folder / io.MANIFEST}: {error}") from None
        require_capabilities(method, adapter)
        prefix = f"{entry['name']}/"
        own = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
        method.restore(adapter, entry["state"], own)


def load(folder: str | Path) -> nn.Module:
    """A runnable module of the source model's own class, with its quantization applied."""
    return load_adapter(folder).model
