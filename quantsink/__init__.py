"""quantsink: post-training quantization for transformers whose accuracy is wrecked by sink
tokens (the few tokens with massive activations that soak up attention).

Importing quantsink imports neither torch nor any backend: the names below load on first use
(PEP 562), and every backend, method, observer, export format and KV cache backend is a lazy
registry entry (quantsink/registry.py) imported when a recipe or a model names it. Importing it
changes nothing outside quantsink (the CLI quiets dependencies' import-time noise, see cli.py)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "quantize": "quantsink.api",
    "load": "quantsink.api",
    "kv_cache": "quantsink.api",
    "evaluate_kv_cache": "quantsink.api",
    "inspect": "quantsink.inspection.run",
    "Inspection": "quantsink.inspection.run",
    "QuantizationResult": "quantsink.api",
    "Recipe": "quantsink.recipe",
    "KVCacheScheme": "quantsink.kv.scheme",
    "SinkQuantizedCache": "quantsink.kv.cache",
}

__all__ = [
    "quantize", "load", "kv_cache", "evaluate_kv_cache", "inspect", "Inspection", "Recipe", "QuantizationResult", "KVCacheScheme",
    "SinkQuantizedCache",
    "__version__",
]

if TYPE_CHECKING:
    from quantsink.api import QuantizationResult, evaluate_kv_cache, kv_cache, load, quantize
    from quantsink.inspection.run import Inspection, inspect
    from quantsink.kv.cache import SinkQuantizedCache
    from quantsink.kv.scheme import KVCacheScheme
    from quantsink.recipe import Recipe


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantsink' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
