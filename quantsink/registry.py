"""One registry pattern for every pluggable part (adapters, methods, quantizers, observers,
export formats, KV cache backends). A recipe names parts by their registered name; an unknown name fails with
the list of known ones, and close matches, so a typo is a one-line fix.

An entry is the part itself, or a lazy "module:attr" string: the module is imported on the first
`get` of that name (which is how importing quantsink, `--help` and `quantsink models` stay
free of torch, torchao, optimum-quanto, open_clip and timm). A module that registers its own
parts with the decorator, when imported, replaces the lazy entries that point into it. `names()`
and `in` never import anything."""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, Generic, Iterator, TypeVar, Union

from quantsink.errors import UserError

T = TypeVar("T")


def normalise(name: str) -> str:
    """The key a name is registered under: case, surrounding space and - vs _ do not matter."""
    return name.strip().lower().replace("_", "-")


class _Lazy:
    """A "module:attr" entry, not imported yet."""

    __slots__ = ("module", "attr")

    def __init__(self, target: str):
        module, colon, attr = target.partition(":")
        if not colon or not module or not attr:
            raise ValueError(f"a lazy registry entry is 'module:attr', got {target!r}")
        self.module, self.attr = module, attr

    def __repr__(self) -> str:
        return f"{self.module}:{self.attr}"

    def points_to(self, obj: object) -> bool:
        """Whether `obj`, being registered now, is what this entry stands for: its module is the
        one importing (or imported), and the attr is `obj`, its class, or not bound yet (a class
        decorator runs before the name is)."""
        module = sys.modules.get(self.module)
        if module is None:
            return False
        bound = getattr(module, self.attr, obj)
        return bound is obj or bound is type(obj)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Union[T, _Lazy]] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: register `obj` under `name` (and `aliases`)."""

        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                key = normalise(key)
                entry = self._entries.get(key, obj)
                if entry is not obj and not (isinstance(entry, _Lazy) and entry.points_to(obj)):
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._entries[key] = obj
            return obj

        return decorator

    def register_lazy(self, name: str, target: str, *aliases: str) -> None:
        """Register `target`, a "module:attr" string, imported on the first `get` of `name`.
        A name already registered with what `target` points to stays as it is."""
        lazy = _Lazy(target)
        for key in (name, *aliases):
            key = normalise(key)
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = lazy
            elif isinstance(entry, _Lazy):
                if (entry.module, entry.attr) != (lazy.module, lazy.attr):
                    raise ValueError(f"{self.kind} {key!r} is registered twice ({entry!r} and {target!r})")
            elif not lazy.points_to(entry):
                raise ValueError(f"{self.kind} {key!r} is registered twice ({entry!r} and {target!r})")

    def get(self, name: str) -> T:
        key = normalise(name)
        if key not in self._entries:
            raise UserError(self.unknown_message(name))
        entry = self._entries[key]
        if isinstance(entry, _Lazy):
            entry = self._load(key, entry)
        return entry

    def _load(self, key: str, lazy: _Lazy) -> T:
        try:
            module = importlib.import_module(lazy.module)
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if not missing or missing == __name__.split(".")[0]:
                raise
            raise UserError(
                f"{self.kind} {key!r} needs the package {missing!r}, which is not installed: "
                f"pip install it (see the dependencies in quantsink's pyproject.toml)"
            ) from None
        entry = self._entries[key]
        if isinstance(entry, _Lazy):  # the module did not register it itself: take its attr
            entry = getattr(module, lazy.attr)
            self._entries[key] = entry
        return entry

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(normalise(name), self._entries, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self.names())}"

    def __contains__(self, name: str) -> bool:
        return normalise(name) in self._entries

    def names(self) -> list[str]:
        """Every registered name, lazy ones included, importing nothing."""
        return sorted(self._entries)

    def is_loaded(self, name: str) -> bool:
        """Whether `name` holds its part already (False for a lazy entry not imported yet)."""
        return not isinstance(self._entries.get(normalise(name)), _Lazy)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, part) for every entry, importing the lazy ones."""
        return iter([(name, self.get(name)) for name in self.names()])


# The registries of pluggable parts that recipes name. Every part quantsink ships is listed
# lazily at the end of this file; its module registers it (the decorator) when imported.
QUANTIZERS: Registry = Registry("quantization backend")
OBSERVERS: Registry = Registry("observer")
METHODS: Registry = Registry("method")
EXPORT_FORMATS: Registry = Registry("export format")
KV_CACHE_BACKENDS: Registry = Registry("KV cache backend")
INT8_KERNELS: Registry = Registry("int8 kernel")


# --- every part quantsink ships, by where it lives: its module is imported on first use --------
# (model families: quantsink/models/__init__.py, beside the adapters)
for _registry, _entries in (
    (QUANTIZERS, {
        "fake": "quantsink.quantizers.fake:FakeQuantizer",
        "int8": "quantsink.quantizers.int8:Int8Quantizer",
        "torchao": "quantsink.quantizers.torchao_backend:TorchAOQuantizer",
        "quanto": "quantsink.quantizers.quanto_backend:QuantoQuantizer",
    }),
    (OBSERVERS, {
        "minmax": "quantsink.observers:Observer",
        "percentile": "quantsink.observers:PercentileObserver",
        "mse": "quantsink.observers:MSEObserver",
    }),
    (METHODS, {
        "regcache": "quantsink.methods.regcache:RegCache",
        "kvsink": "quantsink.methods.kvsink:KVSink",
        "kv-static": "quantsink.methods.kv_static:KVStatic",
        "sink-tokens": "quantsink.methods.sink_tokens:SinkTokens",
        "smoothquant": "quantsink.methods.smoothquant:SmoothQuant",
    }),
    (EXPORT_FORMATS, {
        "fake-quant": "quantsink.exports.fake_quant:FAKE_QUANT",
        "int8": "quantsink.exports.int8:INT8",
        "compressed-tensors": "quantsink.exports.compressed_tensors:COMPRESSED_TENSORS",
    }),
    (KV_CACHE_BACKENDS, {  # the module registers an instance of each class
        "quantsink": "quantsink.kv.backends:QuantsinkKVCacheBackend",
        "transformers-quanto": "quantsink.kv.backends:TransformersQuantoKVCacheBackend",
    }),
):
    for _name, _target in _entries.items():
        _registry.register_lazy(_name, _target)
del _registry, _entries, _name, _target
