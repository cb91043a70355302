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
from collections.abc import Callable
from pathlib import Path

from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, ModelLoadError, UserError
from quantsink.models import hub
from quantsink.models.base import ADAPTERS, Adapter, ModelSource
from quantsink.models.catalog import CATALOG, SHORT_NAMES, SPEC_FORMS, unknown_name
from quantsink.models.causal_lm import HFCausalLMAdapter  # noqa: F401  (registers the LM families)
from quantsink.models.hf import HFAdapter
from quantsink.models.open_clip import OpenCLIPAdapter
from quantsink.models.timm import TimmViTAdapter

__all__ = ["Adapter", "ModelSource", "catalog", "rebuild", "resolve", "save_model"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]+")  # ORG/NAME, as opposed to a path


def resolve(model: str | os.PathLike | nn.Module) -> Adapter:
    """The Adapter for a model spec or an in-memory module (see the module docstring)."""
    if isinstance(model, nn.Module):
        return _from_module(model)
    return _resolve(str(model), spec=str(model))


def rebuild(source: ModelSource, assets_dir: Path | None = None) -> Adapter:
    """The architecture `source` describes, with random weights, and its preprocessing from
    `assets_dir` (a folder quantsink wrote): what loaders fill with saved weights."""
    adapter = ADAPTERS.get(source.family).from_config(source.config, assets_dir=assets_dir)
    adapter.source = source
    return adapter


def save_model(adapter: Adapter, folder: str | os.PathLike) -> Path:
    """Write an unquantized folder that `resolve` loads again, offline."""
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


def _resolve(target: str, spec: str) -> Adapter:
    scheme, colon, rest = target.partition(":")
    if colon and scheme in _HUB_LOADERS:
        return _HUB_LOADERS[scheme](rest, spec)
    path = Path(target).expanduser()
    if path.is_dir():
        return _from_folder(path, spec)
    if path.exists():
        raise UserError(f"{target} is a file, not a model folder: pass the folder that holds it")
    if target in SHORT_NAMES:
        entry = SHORT_NAMES.get(target)
        local = entry.local_folder()
        return _resolve(str(local) if local is not None else entry.spec, spec)
    if _HUB_ID.fullmatch(target):
        raise ModelLoadError(f"there is no folder {target}: for a Hugging Face hub id write hf:{target}")
    if "/" in target or os.sep in target:
        raise UserError(f"there is no folder {target}: check the path")
    raise unknown_name(target)


def _from_hf_hub(repo_id: str, spec: str) -> Adapter:
    return _from_hf_folder(hub.snapshot(spec, repo_id), spec)


def _from_open_clip(name: str, spec: str) -> Adapter:
    arch, _, tag = name.partition("/")
    if not arch or not tag:
        raise UserError(
            f"{spec} names no weights: write open_clip:ARCH/PRETRAINED, e.g. open_clip:ViT-H-14/laion2b_s32b_b79k"
        )
    return OpenCLIPAdapter.from_pretrained(arch, tag, spec)


def _from_timm(name: str, spec: str) -> Adapter:
    return TimmViTAdapter.from_pretrained(name, spec)


_HUB_LOADERS: dict[str, Callable[[str, str], Adapter]] = {
    "hf": _from_hf_hub,
    "open_clip": _from_open_clip,
    "timm": _from_timm,
}


def _from_folder(folder: Path, spec: str) -> Adapter:
    if (folder / io.MANIFEST).is_file():
        return _from_saved_folder(folder)
    if (folder / "config.json").is_file():
        return _from_hf_folder(folder, spec)
    raise UserError(
        f"{folder} has neither config.json (a Hugging Face model folder) nor {io.MANIFEST} (a folder quantsink "
        f"wrote): pass a model folder, a short name from `quantsink models`, or {SPEC_FORMS}"
    )


def _from_hf_folder(folder: Path, spec: str) -> Adapter:
    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"{config_path} is not a readable model config ({error}): re-download the model") from None
    families = [adapter for _, adapter in ADAPTERS.items() if issubclass(adapter, HFAdapter)]
    for adapter in families:
        if model_type in adapter.model_types:
            return adapter.from_pretrained(folder, spec)
    supported = sorted(model for adapter in families for model in adapter.model_types)
    raise ModelLoadError(
        f"{config_path} has model_type {model_type!r}, which quantsink has no adapter for: "
        f"supported model types are {', '.join(supported)}"
    )


def _from_saved_folder(folder: Path) -> Adapter:
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


def _from_module(model: nn.Module) -> Adapter:
    for _, adapter in ADAPTERS.items():
        if adapter.handles(model):
            return adapter.from_module(model)
    raise UserError(
        f"quantsink has no adapter for a {type(model).__name__}: supported families are "
        f"{', '.join(ADAPTERS.names())}; pass a model of one of them, or its spec ({SPEC_FORMS})"
    )
