"""Models whose block weights stay on disk: loaded one block at a time, for sequential passes.

A model of billions of parameters does not fit in memory, and calibrating it one block at a
time (quantsink.sequential) needs only the block it is at. `load_streamed` builds the model with
its parameters on the meta device (accelerate's `init_empty_weights`: no memory; buffers are
computed as usual), reads everything outside the blocks (embeddings, final norm, head) from the
checkpoint, and leaves a `StreamedWeights` that knows, per block tensor, the safetensors file
and key that holds it:

  onload(i)   block i's tensors read from there (safetensors memory-maps the file)
  offload(i)  block i's tensors back to meta (nothing to write: they are the checkpoint's)
  a forward   a block called while on disk comes in for that call only

`make_resident` brings every block back for good, quantizing each as it comes (what an export
writing one file needs). Nothing is written beside the checkpoint, so nothing is left behind.

On an accelerator the blocks are read straight onto it, and those that have come back for good
stay in CPU memory, each copied to the device for its turn (`HostedBlocks`, which also serves a
sequential pass of a model loaded in memory): the device holds one block at a time.
"""
from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantsink.errors import CheckpointError, UserError
from quantsink.memory import return_freed_memory

if TYPE_CHECKING:
    from quantsink.models.base import Adapter

log = logging.getLogger(__name__)

# where the adapter keeps its BlockResidence, streamed or hosted (a plain attribute, never in the state_dict)
STREAMED_ATTRIBUTE = "streamed_weights"


class BlockResidence(ABC):
    """Blocks that stay away from where they compute (`device`) and come to it one at a time:
    `onload(i)` brings block i, `offload(i)` sends it back, and a block called while away comes
    for that call only (accelerate's offload hooks do the same)."""

    def __init__(self, model: nn.Module, block_names: list[str], device: torch.device | str):
        self.model, self.block_names, self.device = model, block_names, torch.device(device)
        self.resident: set[int] = set()
        self._transient: set[int] = set()
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

    @abstractmethod
    def onload(self, index: int) -> None:
        ...

    @abstractmethod
    def offload(self, index: int) -> None:
        ...

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


class HostedBlocks(BlockResidence):
    """Blocks kept in CPU memory for a model that computes on an accelerator (a sequential pass
    on a GPU): each is copied to the device for its turn and back after, so the device holds one
    block and its activations."""

    def onload(self, index: int) -> None:
        if index not in self.resident:
            self.block(index).to(self.device)
            self.resident.add(index)

    def offload(self, index: int) -> None:
        if index in self.resident:
            self.block(index).to("cpu")
            self.resident.discard(index)


class StreamedWeights(BlockResidence):
    """The block weights of one model, on disk (module docstring), read straight onto `device`."""

    def __init__(self, model: nn.Module, block_names: list[str], sources: dict[str, tuple[Path, str]],
                 device: torch.device | str = "cpu"):
        super().__init__(model, block_names, device)
        self.sources = sources  # full tensor name -> (safetensors file, key in it)

    def onload(self, index: int) -> None:
        if index in self.resident:
            return
        device = self.device
        block, prefix = self.block(index), self.block_names[index] + "."
        names = list(block.state_dict())
        tensors = {}
        with contextlib.ExitStack() as files:
            opened: dict[Path, Any] = {}
            expected = block.state_dict()  # meta tensors: the shapes and dtypes the model computes in
            for name in names:
                source = self.sources.get(prefix + name)
                if source is None:  # what a quantizer added and has not computed yet (its scales)
                    tensors[name] = torch.zeros(expected[name].shape, dtype=expected[name].dtype, device=device)
                    continue
                if source[0] not in opened:
                    opened[source[0]] = files.enter_context(safe_open(str(source[0]), framework="pt"))
                # a copy: a tensor read from the memory-mapped file keeps the whole mapping, and every
                # page read through it, resident for as long as it lives (measured: a block's worth
                # of file pages per block that came back for good)
                tensors[name] = opened[source[0]].get_tensor(source[1]).to(device, expected[name].dtype, copy=True)
        block.load_state_dict(tensors, assign=True, strict=True)
        _move_tensors(block, device)  # what the block computed itself (non-persistent buffers) follows
        self.resident.add(index)

    def offload(self, index: int) -> None:
        """Block `index` back on disk: its weights are the checkpoint's, as long as nothing wrote
        into them (what the pipeline refuses before loading: quantsink.pipeline.refuse_streaming)."""
        if index not in self.resident:
            return
        block = self.block(index)
        # the checkpoint's tensors go; what the block computed itself (non-persistent buffers) stays
        for name, tensor in block.state_dict(keep_vars=True).items():
            _assign(block, name, torch.empty_like(tensor, device="meta"))
        self.resident.discard(index)
        return_freed_memory()


def host_blocks(adapter: "Adapter", device: torch.device) -> None:
    """A model on the CPU set to compute on `device` one block at a time: everything but its
    blocks moves there, and each block comes for its turn (HostedBlocks). On the CPU: nothing
    moves, nothing is copied."""
    if device.type == "cpu":
        return
    names = adapter.block_names()
    _move_tensors(adapter.model, device, skip=tuple(adapter.blocks()))
    adapter.__dict__[STREAMED_ATTRIBUTE] = HostedBlocks(adapter.model, names, device)


def _move_tensors(root: nn.Module, device: torch.device, skip: tuple[nn.Module, ...] = ()) -> None:
    """Every parameter and buffer of `root` outside the `skip` modules onto `device`, a tensor
    that two modules share (tied embeddings) moved once and still shared."""
    moved: dict[int, torch.Tensor] = {}
    skipped = {id(module) for block in skip for module in block.modules()}
    for module in root.modules():
        if id(module) in skipped:
            continue
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.is_meta or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    copied = tensor.detach().to(device)
                    if isinstance(tensor, nn.Parameter):
                        copied = nn.Parameter(copied, requires_grad=tensor.requires_grad)
                    moved[id(tensor)] = copied
                table[name] = moved[id(tensor)]


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(module_name)
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attribute] = value


def streamed(adapter: "Adapter") -> BlockResidence | None:
    return adapter.__dict__.get(STREAMED_ATTRIBUTE)


def make_resident(adapter: "Adapter", finalize: Callable[[nn.Module], None] | None = None) -> None:
    """Every block resident for good, one after the other, `finalize(block)` applied to each as
    it comes (the quantizer's freeze: only one block is then ever resident in float, on the
    device it computes on); the hooks gone, an ordinary model again (what an export writing one
    file needs). With a `finalize`, blocks that compute on an accelerator go back to CPU memory
    after it and keep coming one at a time; without, that model ends wholly on the CPU. No-op
    for other models."""
    residence = adapter.__dict__.pop(STREAMED_ATTRIBUTE, None)
    if residence is None:
        return
    residence.close()
    on_accelerator = residence.device.type != "cpu"
    for index in range(len(residence.block_names)):
        residence.onload(index)
        if finalize is not None:
            finalize(residence.block(index))
        if on_accelerator:
            residence.block(index).to("cpu")
        if finalize is not None:
            return_freed_memory()
    if not on_accelerator:
        return
    if finalize is not None:
        host_blocks(adapter, residence.device)
    else:
        _move_tensors(adapter.model, torch.device("cpu"))


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


def load_streamed(build: Callable[[], "Adapter"], files: list[Path], key_map: KeyMap | None = None,
                  device: torch.device | str = "cpu") -> "Adapter":
    """The adapter `build()` gives, built with its parameters on the meta device (accelerate's
    `init_empty_weights`; buffers are computed as usual), everything outside the blocks then read
    from the safetensors `files` onto `device` and the blocks left there to stream to it.
    `key_map(model, keys)`: model tensor name -> key in the files, and the keys it cannot map
    (default: stored as named)."""
    device = torch.device(device)
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
                _assign(model, name, opened.get_tensor(source[1]).to(device, tensor.dtype, copy=True))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # a head that shares the embeddings' weight (saved once) shares it again
        tie()
    still_meta = next((name for name, tensor in model.state_dict().items() if not name.startswith(inside) and tensor.is_meta), None)
    if still_meta is not None:
        raise lacks(still_meta)
    _move_tensors(model, device, skip=tuple(adapter.blocks()))  # the buffers it computed on the CPU
    weights = StreamedWeights(model, names, {name: sources[name] for name in persistent if name.startswith(inside)}, device)
    adapter.__dict__[STREAMED_ATTRIBUTE] = weights
    log.info("loaded %s with its %d blocks streamed from disk", adapter.source.spec, len(names))
    return adapter
