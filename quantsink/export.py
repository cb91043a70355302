"""Writers and the loader of quantsink output folders.

A folder holds `model.safetensors` (the quantized model's state), `quantsink.json` (format
version, model source, recipe, quantizer state: what is needed to rebuild the modules before
loading the tensors), `report.json` and `recipe.yaml`. Formats register by name in
EXPORT_FORMATS; the recipe's `export.format` picks one."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from pydantic import ValidationError
from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, UserError
from quantsink.models import rebuild
from quantsink.models.base import Adapter, ModelSource
from quantsink.models.probe import require_modules_run
from quantsink.quantizers.int8 import int8_export, int8_incompatibility
from quantsink.kv.attach import attach_kv_cache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods.base import require_capabilities
from quantsink.recipe import QuantizationConfig, describe_validation_error
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS

if TYPE_CHECKING:
    from quantsink.api import QuantizationResult

log = logging.getLogger(__name__)

# Tensors of the methods (e.g. RegCache's registers), kept apart from the model's own state.
METHOD_TENSORS = "methods.safetensors"


class ExportFormat:
    """How a quantized model's tensors are laid out in a folder.

    `write` saves them and returns what it changes in quantsink.json's `quantization` section
    (e.g. the backend that runs the saved tensors); `read` turns the saved tensors back into the
    state of the model that backend's `restore` rebuilt. The default is the model's own state."""

    def check(self, config: QuantizationConfig) -> Optional[str]:
        """Why this format cannot hold a model quantized as `config`, or None."""
        return None

    def write(self, result: "QuantizationResult", folder: Path) -> dict[str, Any]:
        io.save_tensors(result.model.state_dict(), folder / io.WEIGHTS)
        return {}

    def read(self, folder: Path, model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        return io.load_tensors(folder / io.WEIGHTS)


# fake: float weights (already quantize-dequantized) beside their scales and zero points, for
# research; other backends: their modules' own state (torchao and quanto: int8 data and scales)
FAKE_QUANT = EXPORT_FORMATS.register("fake-quant")(ExportFormat())


class Int8Export(ExportFormat):
    """int8 weights and float scales (about a quarter of fp32); loads into the int8 backend."""

    def check(self, config: QuantizationConfig) -> Optional[str]:
        if config.backend not in ("fake", "int8"):
            problem = f"quantization.backend is {config.backend}, export.format int8 packs the fake or int8 backend's layers"
        else:
            problem = int8_incompatibility(config)
        return None if problem is None else f"{problem}: use export.format fake-quant"

    def write(self, result: "QuantizationResult", folder: Path) -> dict[str, Any]:
        problem = self.check(result.recipe.quantization)
        if problem is not None:
            raise UserError(problem)
        tensors, state = int8_export(result.model)
        io.save_tensors(tensors, folder / io.WEIGHTS)
        config = result.recipe.quantization.model_copy(update={"backend": "int8"})
        return {"backend": "int8", "config": config.model_dump(mode="json"), "state": state}


INT8 = EXPORT_FORMATS.register("int8")(Int8Export())


def save(result: "QuantizationResult", destination: str | Path) -> Path:
    destination = Path(destination)
    export_format = result.recipe.export.format
    if result.quantizer is None and export_format != "fake-quant":
        raise UserError(
            f"export.format {export_format} packs quantized weights, and the recipe quantizes only the KV cache: "
            "use export.format fake-quant (the weights stay as they are) or add a quantization section"
        )
    with io.atomic_output_dir(destination) as staging:
        format_details = EXPORT_FORMATS.get(export_format).write(result, staging)
        result.adapter.save_assets(staging)
        method_states, method_tensors = [], {}
        for method in result.methods:
            state, tensors = method.state()
            method_states.append({"name": method.name, "state": state})
            method_tensors.update({f"{method.name}/{key}": tensor for key, tensor in tensors.items()})
        if method_tensors:
            io.save_tensors(method_tensors, staging / METHOD_TENSORS)
        io.write_json(
            staging / io.MANIFEST,
            {
                "format_version": io.FORMAT_VERSION,
                "export_format": export_format,
                "source": result.adapter.source.to_dict(),
                "recipe": result.recipe.to_dict(),
                "methods": method_states,
                "quantization": None if result.quantizer is None else {
                    "backend": result.recipe.quantization.backend,
                    "config": result.recipe.quantization.model_dump(mode="json"),
                    "state": result.quantizer.state(result.model),
                    **format_details,
                },
            },
        )
        io.write_json(staging / "report.json", result.report)
        (staging / "recipe.yaml").write_text(result.recipe.to_yaml())
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
    try:
        if quantization is not None:
            config = QuantizationConfig.model_validate(quantization["config"])
            QUANTIZERS.get(quantization["backend"])(config).restore(adapter.model, quantization["state"])
        export_format = EXPORT_FORMATS.get(manifest.get("export_format", "fake-quant"))
    except ValidationError as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: quantization.config.{describe_validation_error(error)}; re-export the folder") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: malformed quantization section ({type(error).__name__}: {error}); re-export the folder") from None
    except CheckpointError:
        raise
    except UserError as error:
        raise CheckpointError(f"{folder / io.MANIFEST}: {error}") from None
    io.load_state_into(adapter.model, export_format.read(folder, adapter.model, manifest), folder / io.WEIGHTS)
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
