"""Proof that what quantsink installs on a model runs: no silent no-ops.

A hook, attention edit or KV transform is only worth something if the model's forward reaches
it. Upstream code moves under us (transformers 5.24 renamed the keyword that hands decoder
layers their KV cache, and a hook waiting for the old name simply never fired), so every install
ends with a probe: one forward of the adapter's smallest input (two tokens, or one tiny image),
after which each installed part must have recorded a run in its `Tally`. A part that did not run
fails the install with one line naming the model class, the transformers version and the part.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn

from quantsink.errors import UserError

if TYPE_CHECKING:
    from quantsink.models.base import Adapter


class NotRunError(UserError):
    """Something installed on a model never ran in its forward: left alone, the model would
    quietly not be quantized (or not be protected) as the recipe says."""


@dataclass
class Tally:
    """How often one installed part acted. The part calls `ran()` each time it does its work."""

    what: str
    runs: int = 0

    def ran(self) -> None:
        self.runs += 1


@torch.no_grad()
def require_runs(
    model: nn.Module,
    tallies: Sequence[Tally],
    forward: Callable[[], Any],
    during: str = "a probe forward",
    fix: str = "install the tested versions (pip install -c constraints.txt -e .) or report it",
) -> None:
    """Run `forward` (by default a probe forward of `model`) and raise NotRunError, saying `fix`,
    unless every tally recorded a run during it."""
    before = [tally.runs for tally in tallies]
    forward()
    silent = [tally.what for tally, runs in zip(tallies, before) if tally.runs == runs]
    if silent:
        shown = ", ".join(silent[:3]) + (f" and {len(silent) - 3} more" if len(silent) > 3 else "")
        raise NotRunError(
            f"{shown} did not run in {during} of {type(model).__name__} (transformers {transformers.__version__}): {fix}"
        )


@contextlib.contextmanager
def tallied_modules(model: nn.Module, names: Iterable[str], what: str = "quantized module") -> Iterator[list[Tally]]:
    """Tallies of the calls to the named submodules while the context lasts."""
    tallies, handles = [], []
    try:
        for name in names:
            tallies.append(Tally(f"{what} {name}"))
            handles.append(model.get_submodule(name).register_forward_hook(_recording(tallies[-1])))
        yield tallies
    finally:
        for handle in handles:
            handle.remove()


def require_modules_run(adapter: "Adapter", names: Iterable[str]) -> None:
    """A probe forward in which every named (quantized) module of the adapter's model runs."""
    with tallied_modules(adapter.model, names) as tallies:
        require_runs(adapter.model, tallies, lambda: adapter.embed(adapter.probe_inputs()))


def _recording(tally: Tally) -> Callable[..., None]:
    return lambda *_: tally.ran()
