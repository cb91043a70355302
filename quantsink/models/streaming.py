"""Models whose block weights stay on disk: loaded one block at a time, for sequential passes.

A model of billions of parameters does not fit in memory, and calibrating it one block at a
time (quantsink.sequential) needs only the block it is at. `load_streamed` builds the model with
its parameters on the meta device (accelerate's `init_empty_weights`: no memory; buffers are
computed as usual), reads everything outside the blocks (embeddings, final norm, head) from the
checkpoint, and leaves a `StreamedWeights` that knows, per block tensor, the safetensors file
and key that holds it:

  onload(i)   block i's tensors read from there (safetensors memory-maps the file)
  offload(i)  block i's tensors back to meta; after `keep(i)` (a block that was quantized) they
              are first written to a private folder of the offload folder, and read from there after
  a forward   a block called while on disk comes in for that call only

`make_resident` brings every block back for good (what an export writing one file needs);
`abandon` removes the private folder of a run that failed or was interrupted.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from quantsink.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from quantsink.models.base import Adapter

log = logging.getLogger(__name__)

# where the adapter keeps its StreamedWeights (a plain attribute, never in the state_dict)
STREAMED_ATTRIBUTE = "streamed_weights"


class StreamedWeights:
    """The block weights of one model, on disk (module docstring)."""

    def __init__(self, model: nn.Module, block_names: list[str], sources: dict[str, tuple[Path, str]], offload_dir: Path):
        self.model, self.block_names = model, block_names
        self.sources = sources  # full tensor name -> (safetensors file, key in it)
        try:
            offload_dir.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="quantsink-weights-", dir=offload_dir))
        except OSError as error:
            raise UserError(f"--offload-dir {offload_dir}: cannot write there ({error.strerror}): pass a writable folder") from None
        self.resident: set[int] = set()
        self._kept: set[int] = set()
        self._transient: set[int] = set()
        # a block called while on disk comes in for that call only (accelerate's hooks do the same)
        self._hooks = []
        for index in range(len(block_names)):
            block = self.block(index)
            self._hooks.append(block.register_forward_pre_hook(lambda *_a, index=index: self._enter(index)))
            self._hooks.append(block.register_forward_hook(lambda *_a, index=index: self._leave(index), always_call=True))

    def _enter(self, index: int) -> None:
        if index not in self.resident:
            self.onload(index)
            self._transient.add(index)

    def _leave(self, index: int) -> None:
        if index in self._transient:
            self._transient.discard(index)
            self.offload(index)

    def block(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.block_names[index])

    def onload(self, index: int) -> None:
        if index in self.resident:
            return
        block, prefix = self.block(index), self.block_names[index] + "."
        names = list(block.state_dict())
        tensors = {}
        with contextlib.ExitStack() as files:
            opened: dict[Path, Any] = {}
            expected = block.state_dict()  # meta tensors: the shapes and dtypes the model computes in
            for name in names:
                source = self.sources.get(prefix + name)
                if source is None:  # what a quantizer added and has not computed yet (its scales)
                    tensors[name] = torch.zeros(expected[name].shape, dtype=expected[name].dtype)
                    continue
                if source[0] not in opened:
                    opened[source[0]] = files.enter_context(safe_open(str(source[0]), framework="pt"))
                tensors[name] = opened[source[0]].get_tensor(source[1]).to(expected[name].dtype)
        block.load_state_dict(tensors, assign=True, strict=True)
        self.resident.add(index)

    def keep(self, index: int) -> None:
        """Block `index` changed while resident (it was quantized): offloading writes it."""
        self._kept.add(index)

    def offload(self, index: int) -> None:
        if index not in self.resident:
            return
        block, prefix = self.block(index), self.block_names[index] + "."
        if index in self._kept:
            path = self.folder / f"block-{index}.safetensors"
            state = {name: tensor.detach().contiguous() for name, tensor in block.state_dict().items()}
            try:
                save_file(state, str(path))
            except OSError as error:
                raise UserError(f"--offload-dir {self.folder.parent}: writing block {index}'s weights failed "
                                f"({error.strerror}): free space there or pass another folder") from None
            self.sources.update({prefix + name: (path, name) for name in state})
            self._kept.discard(index)
        # the checkpoint's tensors go; what the block computed itself (non-persistent buffers) stays
        for name, tensor in block.state_dict(keep_vars=True).items():
            _assign(block, name, torch.empty_like(tensor, device="meta"))
        self.resident.discard(index)

    def close(self) -> None:
        """Remove the private folder and the hooks (also when a run is interrupted)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(module_name)
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attribute] = value


def streamed(adapter: "Adapter") -> StreamedWeights | None:
    return adapter.__dict__.get(STREAMED_ATTRIBUTE)


def make_resident(adapter: "Adapter") -> None:
    """Every block of a streamed model resident for good, its hooks and private folder gone: an
    ordinary model again (what an export writing one file needs). No-op for other models."""
    weights = adapter.__dict__.pop(STREAMED_ATTRIBUTE, None)
    if weights is not None:
        for index in range(len(weights.block_names)):
            weights.onload(index)
        weights.close()


def abandon(adapter: "Adapter") -> None:
    """A streamed model's private folder removed (a run that failed or was interrupted)."""
    weights = adapter.__dict__.pop(STREAMED_ATTRIBUTE, None)
    if weights is not None:
        weights.close()


def checkpoint_sources(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """Every tensor key of the safetensors `files` -> (file, key)."""
    sources = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as opened:
                sources.update({key: (path, key) for key in opened.keys()})
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error}): re-export it") from None
    return sources


KeyMap = Callable[[nn.Module, list[str]], tuple[dict[str, str], list[str]]]


def load_streamed(build: Callable[[], "Adapter"], files: list[Path], offload_dir: Path,
                  key_map: KeyMap | None = None) -> "Adapter":
    """The adapter `build()` gives, built with its parameters on the meta device (accelerate's
    `init_empty_weights`; buffers are computed as usual), everything outside the blocks then read
    from the safetensors `files` and the blocks left there to stream. `key_map(model, keys)`: model
    tensor name -> key in the files, and the keys it cannot map (default: stored as named)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        adapter = build()
    model, names = adapter.model, adapter.block_names()
    inside = tuple(name + "." for name in names)
    stored = checkpoint_sources(files)
    keys, unmapped = key_map(model, list(stored)) if key_map is not None else ({key: key for key in stored}, [])
    sources = {name: stored[key] for name, key in keys.items()}
    persistent = model.state_dict()

    def lacks(name: str) -> Exception:
        if unmapped:
            return UserError(
                f"cannot stream the weights of {adapter.source.spec}: its checkpoint stores {unmapped[0]} in a layout "
                "transformers converts when it loads (merged or split tensors); save the model with quantsink "
                "(quantsink.models.save_model) and stream that folder, or drop --offload-dir"
            )
        return CheckpointError(f"the checkpoint of {adapter.source.spec} lacks {name}: it is not a complete checkpoint")

    for name, tensor in persistent.items():
        source = sources.get(name)
        if name.startswith(inside):
            if source is None:
                raise lacks(name)
        elif source is not None:
            with safe_open(str(source[0]), framework="pt") as opened:
                _assign(model, name, opened.get_tensor(source[1]).to(tensor.dtype))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # a head that shares the embeddings' weight (saved once) shares it again
        tie()
    still_meta = next((name for name, tensor in model.state_dict().items() if not name.startswith(inside) and tensor.is_meta), None)
    if still_meta is not None:
        raise lacks(still_meta)
    weights = StreamedWeights(model, names, {name: sources[name] for name in persistent if name.startswith(inside)}, offload_dir)
    adapter.__dict__[STREAMED_ATTRIBUTE] = weights
    log.info("loaded %s with its %d blocks streamed from disk", adapter.source.spec, len(names))
    return adapter
