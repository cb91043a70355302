"""Model specs become Adapters here.

A spec is a catalog short name (`quantsink models` lists them), `hf:ORG/NAME`,
`open_clip:ARCH/PRETRAINED`, `timm:NAME`, a local folder (a Hugging Face model folder or an
unquantized folder quantsink wrote), or an nn.Module. Hub weights come from the local cache
first; nothing here waits on the network when the machine is declared offline.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from quantsink.errors import CheckpointError, ModelLoadError, UserError
from quantsink.models.catalog import CATALOG, SHORT_NAMES, SPEC_FORMS, unknown_name

if TYPE_CHECKING:
    from torch import nn

    from quantsink.models.base import Adapter, ModelSource
    from quantsink.registry import Registry

__all__ = ["Adapter", "ModelSource", "Placement", "catalog", "rebuild", "resolve", "save_model"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]+")  # ORG/NAME, as opposed to a path

# Every model family, by the adapter that knows it, and the library its models come from. Nothing
# here is imported until a spec, a saved folder or a module needs a family, so that listing the
# catalog imports no torch, and open_clip and timm load only for their own models.
FAMILIES: dict[str, tuple[str, str]] = {
    "hf-clip": ("quantsink.models.hf:HFCLIPAdapter", "transformers"),
    "hf-siglip": ("quantsink.models.hf:HFSiglipAdapter", "transformers"),
    "hf-siglip2": ("quantsink.models.hf:HFSiglip2Adapter", "transformers"),
    "hf-dinov2": ("quantsink.models.hf:HFDinov2Adapter", "transformers"),
    "hf-bert-text": ("quantsink.models.hf:HFBertTextAdapter", "transformers"),
    "hf-llama": ("quantsink.models.causal_lm:HFLlamaAdapter", "transformers"),
    "hf-phi3": ("quantsink.models.causal_lm:HFPhi3Adapter", "transformers"),
    "hf-gpt-neox": ("quantsink.models.causal_lm:HFGPTNeoXAdapter", "transformers"),
    "open-clip": ("quantsink.models.open_clip:OpenCLIPAdapter", "open_clip"),
    "timm-vit": ("quantsink.models.timm:TimmViTAdapter", "timm"),
}


def adapters() -> "Registry[type[Adapter]]":
    """ADAPTERS (quantsink.models.base), with every family of FAMILIES registered in it lazily."""
    from quantsink.models.base import ADAPTERS

    for family, (target, _library) in FAMILIES.items():
        ADAPTERS.register_lazy(family, target)
    return ADAPTERS


def _families(library_ok: Callable[[str | None], bool]) -> list[type[Adapter]]:
    """The adapters of the registered families whose library passes `library_ok` (None: a
    family registered outside FAMILIES, e.g. by a plugin), importing only those."""
    registry = adapters()
    chosen = [name for name in registry.names() if library_ok(FAMILIES[name][1] if name in FAMILIES else None)]
    return [registry.get(name) for name in chosen]


def __getattr__(name: str) -> Any:  # Adapter and ModelSource import torch: only when asked for
    if name in ("Adapter", "ModelSource"):
        from quantsink.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Placement:
    """Where a loaded model's weights go: all on `device` (a torch device name, resolved:
    quantsink.distributed.device_for), or with `device_map` "auto" over the devices accelerate
    chooses for a transformers model, within `max_memory` per device (ExecutionConfig)."""

    device: str = "cpu"
    device_map: Optional[str] = None
    max_memory: Optional[dict[str, int | str]] = None

    def refuse_device_map(self, what: str) -> None:
        if self.device_map is not None:
            raise UserError(f"execution.device_map {self.device_map} loads a transformers model folder through accelerate, "
                            f"and {what} loads otherwise: drop device_map (execution.device puts the whole model on one device)")


ON_CPU = Placement()


def resolve(model: str | os.PathLike | nn.Module, stream_weights: bool = False, placement: Placement = ON_CPU) -> Adapter:
    """The Adapter for a model spec or an in-memory module (see the module docstring), its
    weights where `placement` says (an in-memory module moves there in place); with
    `stream_weights`, a local folder's block weights stay on disk (quantsink.models.streaming)
    and come to `placement.device` one block at a time."""
    if stream_weights:
        placement.refuse_device_map("a model streamed from disk (--offload-dir)")
        return _streamed(model, placement.device)
    if not isinstance(model, (str, os.PathLike)):
        from torch import nn

        if isinstance(model, nn.Module):
            placement.refuse_device_map("a module already in memory")
            return _placed(_from_module(model), placement)
    return _placed(_resolve(str(model), str(model), placement), placement)


def _placed(adapter: Adapter, placement: Placement) -> Adapter:
    """`adapter` with its model on `placement.device`, unless accelerate placed it (device_map);
    a model on the CPU asked for the CPU is left as it is, not copied."""
    if placement.device_map is None and placement.device != "cpu":
        adapter.model.to(placement.device)
    return adapter


def rebuild(source: ModelSource, assets_dir: Path | None = None) -> Adapter:
    """The architecture `source` describes, with random weights, and its preprocessing from
    `assets_dir` (a folder quantsink wrote): what loaders fill with saved weights."""
    adapter = adapters().get(source.family).from_config(source.config, assets_dir=assets_dir)
    adapter.source = source
    return adapter


def save_model(adapter: Adapter, folder: str | os.PathLike) -> Path:
    """Write an unquantized folder that `resolve` loads again, offline."""
    from quantsink import io

    with io.atomic_output_dir(folder) as staging:
        io.save_tensors(adapter.model.state_dict(), staging / io.WEIGHTS)
        adapter.save_assets(staging)
        io.write_json(
            staging / io.MANIFEST,
            {"format_version": io.FORMAT_VERSION, "source": adapter.source.to_dict(), "quantization": None},
        )
    return Path(folder)


def catalog() -> list[tuple[str, str, str, str]]:
    """(short name, spec, family, note) for every model the catalog names."""
    return [(entry.name, entry.spec, entry.family, entry.note) for entry in CATALOG]


def _resolve(target: str, spec: str, placement: Placement = ON_CPU) -> Adapter:
    scheme, colon, rest = target.partition(":")
    if colon and scheme in _HUB_LOADERS:
        return _HUB_LOADERS[scheme](rest, spec, placement)
    path = Path(target).expanduser()
    if path.is_dir():
        return _from_folder(path, spec, placement)
    if path.exists():
        raise UserError(f"{target} is a file, not a model folder: pass the folder that holds it")
    if target in SHORT_NAMES:
        entry = SHORT_NAMES.get(target)
        local = entry.local_folder()
        return _resolve(str(local) if local is not None else entry.spec, spec, placement)
    if _HUB_ID.fullmatch(target):
        raise ModelLoadError(f"there is no folder {target}: for a Hugging Face hub id write hf:{target}")
    if "/" in target or os.sep in target:
        raise UserError(f"there is no folder {target}: check the path")
    raise unknown_name(target)


def _from_hf_hub(repo_id: str, spec: str, placement: Placement) -> Adapter:
    from quantsink.models import hub

    return _from_hf_folder(hub.snapshot(spec, repo_id), spec, placement)


def _from_open_clip(name: str, spec: str, placement: Placement) -> Adapter:
    placement.refuse_device_map(f"{spec} (open_clip)")
    arch, _, tag = name.partition("/")
    if not arch or not tag:
        raise UserError(
            f"{spec} names no weights: write open_clip:ARCH/PRETRAINED, e.g. open_clip:ViT-H-14/laion2b_s32b_b79k"
        )
    return adapters().get("open-clip").from_pretrained(arch, tag, spec)


def _from_timm(name: str, spec: str, placement: Placement) -> Adapter:
    placement.refuse_device_map(f"{spec} (timm)")
    return adapters().get("timm-vit").from_pretrained(name, spec)


_HUB_LOADERS: dict[str, Callable[[str, str, Placement], Adapter]] = {
    "hf": _from_hf_hub,
    "open_clip": _from_open_clip,
    "timm": _from_timm,
}


def _from_folder(folder: Path, spec: str, placement: Placement = ON_CPU) -> Adapter:
    from quantsink import io

    if (folder / io.MANIFEST).is_file():
        placement.refuse_device_map(f"{folder}, a folder quantsink wrote,")
        return _from_saved_folder(folder)
    if (folder / "config.json").is_file():
        return _from_hf_folder(folder, spec, placement)
    raise UserError(
        f"{folder} has neither config.json (a Hugging Face model folder) nor {io.MANIFEST} (a folder quantsink "
        f"wrote): pass a model folder, a short name from `quantsink models`, or {SPEC_FORMS}"
    )


def _from_hf_folder(folder: Path, spec: str, placement: Placement = ON_CPU) -> Adapter:
    return _hf_family(folder).from_pretrained(folder, spec, placement)


def _hf_family(folder: Path) -> type[Adapter]:
    """The transformers family whose model types include the folder's config's."""
    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"{config_path} is not a readable model config ({error}): re-download the model") from None
    from quantsink.models.hf import HFAdapter

    families = [adapter for adapter in _families(lambda library: library in (None, "transformers")) if issubclass(adapter, HFAdapter)]
    for adapter in families:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(model for adapter in families for model in adapter.model_types)
    raise ModelLoadError(
        f"{config_path} has model_type {model_type!r}, which quantsink has no adapter for: "
        f"supported model types are {', '.join(supported)}"
    )


def _from_saved_folder(folder: Path) -> Adapter:
    from quantsink import io
    from quantsink.models.base import ModelSource

    manifest = io.read_manifest(folder)
    if manifest.get("quantization") is not None:
        raise UserError(
            f"{folder} holds a quantized model: load it with quantsink.load({str(folder)!r}) "
            "instead of quantizing it again"
        )
    if not isinstance(manifest.get("source"), dict):
        raise CheckpointError(f"{folder / io.MANIFEST} does not say which model it holds (no source): re-export it")
    adapter = rebuild(ModelSource.from_dict(manifest["source"]), assets_dir=folder)
    io.load_state_into(adapter.model, io.load_tensors(folder / io.WEIGHTS), folder)
    logger.info("loaded %s (%s) from %s", adapter.source.spec, adapter.family, folder)
    return adapter


def _streamed(model: str | os.PathLike | nn.Module, device: str) -> Adapter:
    """A local folder's model with its blocks on the meta device and their weights on disk, the
    rest of it on `device`, where each block comes for its turn."""
    from quantsink import io
    from quantsink.models.base import ModelSource
    from quantsink.models.streaming import load_streamed

    folder = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if folder is not None and not folder.is_dir() and str(model) in SHORT_NAMES:
        folder = SHORT_NAMES.get(str(model)).local_folder()  # a short name whose package ships the folder
    if folder is None or not folder.is_dir():
        raise UserError(
            f"--offload-dir streams weights from a local model folder, and {model if folder is not None else 'a module in memory'} "
            "is not one: pass the folder (a hub model: its snapshot folder in the Hugging Face cache), or drop --offload-dir"
        )
    if (folder / io.MANIFEST).is_file():
        manifest = io.read_manifest(folder)
        if manifest.get("quantization") is not None or not isinstance(manifest.get("source"), dict):
            return _from_saved_folder(folder)  # its own one-line refusal
        source = ModelSource.from_dict(manifest["source"])
        return load_streamed(lambda: rebuild(source, assets_dir=folder), [folder / io.WEIGHTS], device=device)
    if (folder / "config.json").is_file():
        family = _hf_family(folder)
        from transformers import AutoConfig

        model_class, config = family.architecture(AutoConfig.from_pretrained(folder))
        processor = family.load_processor(folder)

        def build_hf() -> Adapter:
            return family.from_module(model_class(config, **family.build_kwargs), str(model), processor)

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} holds no safetensors weights: the folder needs them to stream its blocks")
        from quantsink.models.hf import checkpoint_names

        return load_streamed(build_hf, files, checkpoint_names, device=device)
    return _from_folder(folder, str(model))  # its own one-line refusal


def _from_module(model: nn.Module) -> Adapter:
    # a model of a library exists only once that library is imported: the others' families are
    # not candidates (and stay unimported)
    for adapter in _families(lambda library: library is None or library in sys.modules):
        if adapter.handles(model):
            return adapter.from_module(model)
    raise UserError(
        f"quantsink has no adapter for a {type(model).__name__}: supported families are "
        f"{', '.join(adapters().names())}; pass a model of one of them, or its spec ({SPEC_FORMS})"
    )
