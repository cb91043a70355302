"""One registry pattern for every pluggable part (adapters, methods, quantizers, observers,
export formats, KV cache backends). A recipe names parts by their registered name; an unknown name fails with
the list of known ones, and close matches, so a typo is a one-line fix."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from quantsink.errors import UserError

T = TypeVar("T")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                key = _normalise(key)
                if key in self._entries and self._entries[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        key = _normalise(name)
        if key not in self._entries:
            raise UserError(self.unknown_message(name))
        return self._entries[key]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(_normalise(name), self._entries, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self.names())}"

    def __contains__(self, name: str) -> bool:
        return _normalise(name) in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))


# The registries of pluggable parts that recipes name. Implementations register themselves
# when their module is imported (quantsink/__init__.py imports them all).
QUANTIZERS: Registry = Registry("quantization backend")
OBSERVERS: Registry = Registry("observer")
METHODS: Registry = Registry("method")
EXPORT_FORMATS: Registry = Registry("export format")
KV_CACHE_BACKENDS: Registry = Registry("KV cache backend")
