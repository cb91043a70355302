"""One way to put things on a model and take them off again.

Whatever quantsink installs on a model (hooks, attention edits, a register prefix, a token
deletion, a sink predictor, KV transforms) goes into the HandleSet that `installing(model, key)`
opens; `remove()` takes all of it off, last first. Installs are keyed on the model, so installing
under the same key again removes the earlier one first: installs replace, they never stack. An
install that fails midway takes off what it had put on.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional, Protocol, TypeVar

from torch import nn

# the installs in force on a model, by key: a plain attribute, never in the state_dict
INSTALLED_ATTRIBUTE = "quantsink_installed"


class Removable(Protocol):
    def remove(self) -> None: ...


R = TypeVar("R", bound=Removable)


class ForwardState(Protocol):
    """What an install keeps from one block to a later one within a single forward (the tokens a
    deletion kept, the rows a predictor found). Sequential calibration runs every batch through
    one block before the next block sees any, so it swaps each batch's state in and out."""

    def forward_state(self) -> Any: ...

    def load_forward_state(self, state: Any) -> None: ...


class HandleSet:
    """What one install put on a model."""

    def __init__(self, model: nn.Module, key: str):
        self.model, self.key = model, key
        self._undo: list[Callable[[], None]] = []
        # None until the install declares it (`carries`): sequential calibration refuses an
        # install that has not said whether it keeps state between blocks
        self.forward_states: Optional[list[ForwardState]] = None
        self.not_blockwise: Optional[str] = None  # why this install cannot run one block at a time

    def carries(self, *holders: ForwardState) -> None:
        """Declare what this install keeps between blocks within one forward: `holders`, or
        nothing when called without any."""
        self.forward_states = [*(self.forward_states or []), *holders]

    def needs_whole_forwards(self, why: str) -> None:
        """Declare that this install cannot run block by block, and why (said when refused)."""
        self.not_blockwise = why

    def add(self, handle: R) -> R:
        """Record `handle` (anything with `.remove()`: a torch hook handle, another HandleSet)."""
        self._undo.append(handle.remove)
        return handle

    def on_remove(self, undo: Callable[[], Any]) -> None:
        """Record a call that takes something off."""
        self._undo.append(undo)

    def __enter__(self) -> "HandleSet":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        installed = self.model.__dict__.get(INSTALLED_ATTRIBUTE, {})
        if installed.get(self.key) is self:
            del installed[self.key]


@contextlib.contextmanager
def installing(model: nn.Module, key: str) -> Iterator[HandleSet]:
    """A HandleSet for what is about to be installed on `model` under `key`, the earlier install
    under `key` removed first; on an error inside the block, everything recorded is removed."""
    installed = model.__dict__.setdefault(INSTALLED_ATTRIBUTE, {})
    if key in installed:
        installed[key].remove()
    handles = installed[key] = HandleSet(model, key)
    try:
        yield handles
    except BaseException:
        handles.remove()
        raise


def installed(model: nn.Module) -> dict[str, HandleSet]:
    """The installs in force on `model`, by key."""
    return dict(model.__dict__.get(INSTALLED_ATTRIBUTE, {}))
