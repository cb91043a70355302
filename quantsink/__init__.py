"""quantsink: post-training quantization for transformers whose accuracy is wrecked by sink
tokens (the few tokens with massive activations that soak up attention).

Importing quantsink imports neither torch nor any backend: the names below load on first use
(PEP 562), and every backend, method, observer, export format and KV cache backend is a lazy
registry entry (quantsink/registry.py) imported when a recipe or a model names it."""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "quantize": "quantsink.api",
    "load": "quantsink.api",
    "kv_cache": "quantsink.api",
    "evaluate_kv_cache": "quantsink.api",
    "QuantizationResult": "quantsink.api",
    "Recipe": "quantsink.recipe",
    "SinkQuantizedCache": "quantsink.kvcache",
}

__all__ = [
    "quantize", "load", "kv_cache", "evaluate_kv_cache", "Recipe", "QuantizationResult", "SinkQuantizedCache", "__version__",
]

if TYPE_CHECKING:
    from quantsink.api import QuantizationResult, evaluate_kv_cache, kv_cache, load, quantize
    from quantsink.kvcache import SinkQuantizedCache
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


class _DropThirdPartyNoise(logging.Filter):
    """Drops log records that dependencies emit at import and that tell a quantsink user
    nothing they can act on. Only the exact messages listed; quantsink's own loggers untouched."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# Only exact messages, each on the logger of the module that emits it:
_NOISE = {
    # torchao (imported by transformers whenever it is installed) registers its enums as pytree
    # constants, and torch >= 2.14 warns once per enum that this is deprecated: a note for
    # torchao's developers, printed on every run that loads a transformers model
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    # optimum-quanto imports torch's extension builder, which warns on a machine with a CUDA
    # toolkit and no GPU; quantsink builds no extension (on CPU quanto runs its Python kernels)
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
for _logger, _fragment in _NOISE.items():
    logging.getLogger(_logger).addFilter(_DropThirdPartyNoise(_fragment))
del _logger, _fragment
