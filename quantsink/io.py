"""The on-disk layout every quantsink folder shares: `model.safetensors` + `quantsink.json`.

Writers go through `atomic_output_dir` so that a failure or Ctrl-C midway leaves nothing at
the destination. Weights are read only from safetensors: nothing here unpickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantsink.errors import CheckpointError, UserError

MANIFEST = "quantsink.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_output_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `destination`; rename it into place only on success."""
    destination = Path(destination)
    if destination.exists():
        raise UserError(f"output folder {destination} already exists: remove it or pass another -o")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_json_atomically(path: Path, data: Any) -> None:
    """Write beside `path`, then rename over it: a reader never sees half a file."""
    staging = path.with_name(f".{path.name}.partial")
    write_json(staging, data)
    os.replace(staging, path)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it was not written by quantsink (quantize it first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): re-export the folder") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {manifest.get('format_version')!r}, this quantsink reads {FORMAT_VERSION}"
        )
    return manifest


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or strided storage; tied weights are saved once per name
    save_file({name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the folder is incomplete, re-export it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}): re-export it") from None


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy `tensors` into `module`, refusing missing, unexpected, mis-shaped or mis-typed entries."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{origin} does not match the model: {'; '.join(parts)}; re-export it")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[name].shape)}; re-export it"
            )
        # float widths may differ (a bf16 checkpoint into a float32 rebuild); integers
        # (quantized weights, zero points) would be silently truncated or reinterpreted
        wanted = expected[name].dtype
        if tensor.dtype != wanted and not (tensor.is_floating_point() and wanted.is_floating_point):
            raise CheckpointError(f"{origin}: tensor {name} is {tensor.dtype}, the model needs {wanted}; re-export it")
    module.load_state_dict(tensors, strict=True)
