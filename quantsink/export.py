"""Writers and the loader of quantsink output folders.

A folder holds `model.safetensors` (the quantized model's state), `quantsink.json` (format
version, model source, recipe, quantizer state: what is needed to rebuild the modules before
loading the tensors), `report.json` and `recipe.yaml`. Formats register by name in
EXPORT_FORMATS; the recipe's `export.format` picks one."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, UserError
from quantsink.models import rebuild
from quantsink.models.base import Adapter, ModelSource
from quantsink.recipe import QuantizationConfig
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS

if TYPE_CHECKING:
    from quantsink.api import QuantizationResult

log = logging.getLogger(__name__)

# Tensors of the methods (e.g. RegCache's registers), kept apart from the model's own state.
METHOD_TENSORS = "methods.safetensors"


@EXPORT_FORMATS.register("fake-quant")
def write_fake_quant(result: "QuantizationResult", folder: Path) -> dict[str, Any]:
    """Float weights (already quantize-dequantized) beside their scales and zero points."""
    io.save_tensors(result.model.state_dict(), folder / io.WEIGHTS)
    return {}


def save(result: "QuantizationResult", destination: str | Path) -> Path:
    destination = Path(destination)
    export_format = result.recipe.export.format
    with io.atomic_output_dir(destination) as staging:
        format_details = EXPORT_FORMATS.get(export_format)(result, staging)
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
                "quantization": {
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
    if quantization is not None:
        config = QuantizationConfig.model_validate(quantization["config"])
        QUANTIZERS.get(quantization["backend"])(config).restore(adapter.model, quantization["state"])
    io.load_state_into(adapter.model, io.load_tensors(folder / io.WEIGHTS), folder / io.WEIGHTS)
    adapter.model.eval()
    return adapter


def restore_methods(adapter: Adapter, method_states: list[dict[str, Any]], folder: Path) -> None:
    tensors = io.load_tensors(folder / METHOD_TENSORS) if method_states and (folder / METHOD_TENSORS).exists() else {}
    for entry in method_states:
        try:
            method = METHODS.get(entry["name"])
        except UserError as error:
            raise CheckpointError(f"{folder / io.MANIFEST}: {error}") from None
        prefix = f"{entry['name']}/"
        own = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
        method.restore(adapter, entry["state"], own)


def load(folder: str | Path) -> nn.Module:
    """A runnable module of the source model's own class, with its quantization applied."""
    return load_adapter(folder).model
