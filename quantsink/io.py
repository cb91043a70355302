"""The on-disk layout every quantsink folder shares: `model.safetensors` + `quantsink.json`.

Writers go through `atomic_output_dir` so that a failure or Ctrl-C midway leaves nothing at
the destination. Weights are read only from safetensors: nothing here unpickles.
"""
from __future__ import annotations

import contextlib
import errno
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


# errors of writing that are about the destination (its disk, its permissions), not a bug
_DESTINATION_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@contextlib.contextmanager
def atomic_output_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `destination`; rename it into place only on success.
    On failure nothing is left: neither the temporary folder nor the parents it created. A
    destination that cannot be written (see `check_output_dir`) is a one-line UserError."""
    destination = Path(destination)
    created, staging = _make_staging(destination)
    try:
        yield staging
        try:
            staging.rename(destination)
        except OSError as error:
            raise UserError(_cannot_create(destination, error)) from None
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        if isinstance(error, OSError) and error.errno in _DESTINATION_ERRNOS:
            raise UserError(
                f"writing {destination} failed ({_describe(error)}); nothing was written: "
                "free some space or pass an -o on another disk"
            ) from None
        raise


def check_output_dir(destination: str | os.PathLike) -> None:
    """Refuse, as a one-line UserError with the cause and the fix, an output folder that exists
    or cannot be created (a parent is a file, no permission, a read-only or special file system),
    by creating and removing what `atomic_output_dir` will: called before calibration starts, so
    that no time is spent on a run whose result cannot be written. Leaves nothing behind."""
    created, staging = _make_staging(Path(destination))
    staging.rmdir()
    _remove_created(created)


def _make_staging(destination: Path) -> tuple[list[Path], Path]:
    """(the parent folders created, outermost first; the empty temporary folder beside
    `destination`)."""
    if destination.exists() or destination.is_symlink():
        raise UserError(f"output folder {destination} already exists: remove it or pass another -o")
    missing, ancestor = [], destination.parent
    while not (ancestor.exists() or ancestor.is_symlink()):
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"cannot create output folder {destination}: {ancestor} is a file, not a folder; "
            "pass an -o outside it (or move the file away)"
        )
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    except OSError as error:
        _remove_created(created)
        raise UserError(_cannot_create(destination, error)) from None
    return created, staging


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


def _cannot_create(destination: Path, error: OSError) -> str:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "pass an -o in a folder you can write to"
    elif error.errno == errno.EEXIST:
        fix = "remove it or pass another -o"
    else:
        fix = "pass an -o in an existing folder you can write to"
    return f"cannot create output folder {destination} ({_describe(error)}): {fix}"


def _describe(error: OSError) -> str:
    cause = error.strerror or type(error).__name__
    return f"{cause}: {error.filename}" if error.filename else cause


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_json_atomically(path: Path, data: Any) -> None:
    """Write beside `path`, then rename over it: a reader never sees half a file. A file that
    cannot be written is a one-line UserError, and leaves nothing behind."""
    staging = path.with_name(f".{path.name}.partial")
    try:
        write_json(staging, data)
        os.replace(staging, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            staging.unlink()
        raise UserError(f"cannot write {path} ({_describe(error)}): make its folder writable, or copy the folder elsewhere first") from None


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
    """Write `tensors` as they are: safetensors refuses entries that share storage (tied
    weights, saved once per name) or are strided, so only those are copied, not the whole model."""
    owners: set[tuple[torch.device, int]] = set()
    written = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        shared = storage in owners
        owners.add(storage)
        written[name] = tensor.clone() if shared else tensor.contiguous()
    save_file(written, str(path))


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
