"""Forward passes over a calibration set, in memory or one block at a time.

`forward_passes(adapter, batches, execution)` runs every batch through the adapter's model while
the caller's hooks collect (statistics, observers, a method's profile). What the hooks see is
the same in both modes; only the order differs, and every collector here is keyed by block or by
module, so it gives the same result (tests/test_sequential.py checks it bit for bit).

`in_memory`: each batch runs through the whole model (`adapter.embed`), batch after batch.

`sequential` (llm-compressor's sequential pipeline, without its tracing): the whole calibration
set goes through block 0, then through block 1, and so on, so what is live at once is one
block's activations for one batch plus the residual stream of every batch at one depth, kept on
CPU or, with `offload_dir`, in safetensors files there. On an accelerator each block comes to it
for its turn (quantsink.models.streaming.HostedBlocks) and each stream for its call. Three steps:

  capture  each batch runs through the model with every block replaced by a stand-in that
           notes the call (the stream entering block 0, and every block's other arguments: masks,
           rotary embeddings) and passes the stream on; the last stand-in stops the forward, so
           the stem (embeddings) runs once and nothing after the blocks runs.
  blocks   block i is called on every batch's stream, with that batch's noted arguments; its
           output is the stream entering block i + 1.
  tail     each batch runs through the model again with every block a stand-in, the last one
           giving the real output of the last block, so what follows the blocks (final norm,
           pooler, projection, LM head) runs on it. The stem runs a second time, its watched
           modules (a Linear patch embedding) standing in with what they gave in the capture,
           so that each is observed once.

What an install keeps from one block to a later one within a forward (a token deletion's kept
tokens, a predictor's rows) is saved per batch and swapped in before each batch reaches a block
(quantsink.models.handles.ForwardState); an install that has not declared what it keeps is
refused, since running it block by block could mix batches up.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from quantsink.errors import UserError
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.handles import ForwardState, installed
from quantsink.memory import return_freed_memory
from quantsink.models.streaming import streamed
from quantsink.recipe import ExecutionConfig

Batch = dict[str, torch.Tensor]
IN_MEMORY = ExecutionConfig()


@torch.no_grad()
def forward_passes(
    adapter: Adapter,
    batches: Sequence[Batch],
    execution: ExecutionConfig = IN_MEMORY,
    before_batch: Optional[Callable[[Batch], None]] = None,
    watched: Sequence[str] = (),
    desc: str = "calibrating",
    progress: bool = True,
) -> list[torch.Tensor]:
    """Run every batch of `batches` through `adapter`'s model as `execution` says, calling
    `before_batch(batch)` each time a batch enters the model (sequential: each block); the
    embedding of each batch. `watched`: qualified names of the modules the caller collects from,
    outside the blocks too. A model whose weights stream from disk always runs sequentially."""
    before = before_batch or (lambda _batch: None)
    if execution.pipeline == "in_memory" and streamed(adapter) is None:
        embeddings = []
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            before(batch)
            embeddings.append(adapter.embed(batch))
            return_freed_memory()  # as the sequential pass does, so that both modes hold what they use
        return embeddings
    offload_dir = None if execution.offload_dir is None else Path(execution.offload_dir)
    return SequentialForward(adapter, offload_dir).run(batches, before, watched, desc, progress)


class _StandIn(nn.Module):
    """Takes a block's place during the capture and the tail; attributes the model's loop reads
    from its blocks (an attention type) come from the block it stands in for."""

    def __init__(self, block: nn.Module, call: Callable[..., Any]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the model's tree stays the same size
        object.__setattr__(self, "_call", call)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._call(hidden, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _Captured(Exception):
    """Stops the capture once the last block's call is noted."""


class _Streams:
    """The residual stream of every batch at one depth: in memory, or one safetensors file per
    batch under a private folder of `offload_dir`, removed when the pass ends however it ends."""

    def __init__(self, offload_dir: Optional[Path]):
        self.folder: Optional[Path] = None
        self._memory: dict[int, torch.Tensor] = {}
        if offload_dir is not None:
            try:
                offload_dir.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="quantsink-streams-", dir=offload_dir))
            except OSError as error:
                raise UserError(f"--offload-dir {offload_dir}: cannot write there ({error.strerror}): "
                                "pass a writable folder") from None

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to("cpu")  # off the device the block ran on (the same tensor on the CPU)
        if self.folder is None:
            self._memory[batch] = hidden
            return
        try:
            save_file({"hidden": hidden.contiguous()}, self.folder / f"{batch}.safetensors")
        except OSError as error:
            raise UserError(f"--offload-dir {self.folder.parent}: writing a block's inputs failed ({error.strerror}): "
                            "free space there or pass another folder") from None

    def get(self, batch: int) -> torch.Tensor:
        if self.folder is None:
            return self._memory[batch]
        return load_file(self.folder / f"{batch}.safetensors")["hidden"]

    def close(self) -> None:
        self._memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class SequentialForward:
    """One sequential pass of `adapter`'s model (module docstring)."""

    def __init__(self, adapter: Adapter, offload_dir: Optional[Path] = None):
        self.adapter, self.offload_dir = adapter, offload_dir
        self.blocks = adapter.blocks()
        self.weights = streamed(adapter)
        # where the blocks compute: the streams, kept on the CPU, go there for each call
        self.device = adapter.input_device
        self.names = adapter.block_names()
        self.holders = self._forward_state_holders()
        # per watched module of the stem (what runs before the first block): its output per batch
        self.stem_outputs: dict[str, list[Any]] = {}

    def _forward_state_holders(self) -> list[ForwardState]:
        holders = []
        for key, handles in installed(self.adapter.model).items():
            if handles.not_blockwise is not None:
                raise UserError(f"execution.pipeline sequential: {handles.not_blockwise}")
            if handles.forward_states is None:
                raise UserError(
                    f"execution.pipeline sequential: the {key} install on the model has not said what it keeps between "
                    "blocks within a forward, so running it block by block could mix batches up: use pipeline: in_memory"
                )
            holders += handles.forward_states
        return holders

    def _states(self) -> list[Any]:
        return [holder.forward_state() for holder in self.holders]

    def _load(self, states: list[Any]) -> None:
        for holder, state in zip(self.holders, states):
            holder.load_forward_state(state)

    @contextlib.contextmanager
    def _stood_in(self, call: Callable[[int, torch.Tensor, tuple, dict], Any]) -> Iterator[None]:
        model = self.adapter.model
        for index, (name, block) in enumerate(zip(self.names, self.blocks)):
            model.set_submodule(name, _StandIn(block, lambda hidden, args, kwargs, index=index: call(index, hidden, args, kwargs)))
        try:
            yield
        finally:
            for name, block in zip(self.names, self.blocks):
                model.set_submodule(name, block)

    def run(self, batches: Sequence[Batch], before: Callable[[Batch], None], watched: Sequence[str], desc: str,
            progress: bool) -> list[torch.Tensor]:
        batches = list(batches)  # the set is walked once per block
        streams = _Streams(self.offload_dir)
        try:
            calls, templates, states = self._capture(batches, before, streams, watched)
            steps = len(self.blocks) * len(batches) + len(batches)
            with tqdm(total=steps, desc=f"{desc} (sequential)", unit="block-batch", disable=not progress) as bar:
                for index, block in enumerate(self.blocks):
                    if self.weights is not None:
                        self.weights.onload(index)
                    for number, batch in enumerate(batches):
                        self._load(states[number])
                        before(batch)
                        args, kwargs = calls[number][index]
                        output = block(streams.get(number).to(self.device), *args, **kwargs)
                        states[number] = self._states()
                        # the shape of the output without the stream, for the tail to rebuild
                        templates[number] = None if isinstance(output, torch.Tensor) else (None, *output[1:])
                        streams.put(number, hidden_states_of(output))
                        del output
                        return_freed_memory()  # one batch's activations, not the heap's high-water mark
                        bar.update()
                    if self.weights is not None:
                        self.weights.offload(index)
                return self._tail(batches, before, streams, templates, states, bar)
        finally:
            streams.close()

    def _capture(self, batches: Sequence[Batch], before: Callable[[Batch], None], streams: _Streams,
                 watched: Sequence[str]) -> tuple[list[list[tuple[tuple, dict]]], list[Any], list[list[Any]]]:
        """Per batch: every block's call arguments but the stream, and the installs' state after
        the stem; what the watched modules that sit in the stem gave, for the tail to replay."""
        model, last = self.adapter.model, len(self.blocks) - 1
        calls: list[list[tuple[tuple, dict]]] = []

        def record(name: str):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                self.stem_outputs.setdefault(name, []).append(output)
            return hook

        self.stem_outputs.clear()
        observed = [model.get_submodule(name).register_forward_hook(record(name)) for name in watched]

        def note(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            if index == 0:
                streams.put(len(calls) - 1, hidden)
            calls[-1].append((args, kwargs))
            if index == last:
                raise _Captured
            return hidden

        states = []
        try:
            with self._stood_in(note):
                for batch in batches:
                    calls.append([])
                    before(batch)
                    try:
                        self.adapter.embed(batch)
                    except _Captured:
                        pass
                    else:
                        raise RuntimeError(f"the last block of {type(model).__name__} did not run in its forward")
                    states.append(self._states())
        finally:
            for handle in observed:
                handle.remove()
        return calls, [None] * len(batches), states

    def _tail(self, batches: Sequence[Batch], before: Callable[[Batch], None], streams: _Streams,
              templates: list[Any], states: list[list[Any]], bar: tqdm) -> list[torch.Tensor]:
        last = len(self.blocks) - 1
        current: dict[str, Any] = {}

        def replay(index: int, hidden: torch.Tensor, _args: tuple, _kwargs: dict) -> Any:
            if index < last:
                return hidden
            output, template = current["hidden"], current["template"]
            return output if template is None else (output, *template[1:])

        # the watched modules of the stem give what they gave in the capture, so that they are
        # observed once; nothing of the stem reaches the blocks' outputs here anyway
        model = self.adapter.model
        stem = {name: model.get_submodule(name) for name in self.stem_outputs}
        for name, module in stem.items():
            model.set_submodule(name, _StandIn(module, lambda *_a, name=name: self.stem_outputs[name][current["number"]]))
        embeddings = []
        try:
            with self._stood_in(replay):
                for number, batch in enumerate(batches):
                    current.update(number=number, hidden=streams.get(number).to(self.device), template=templates[number])
                    self._load(states[number])
                    before(batch)
                    embeddings.append(self.adapter.embed(batch))
                    bar.update()
        finally:
            for name, module in stem.items():
                model.set_submodule(name, module)
        return embeddings
