"""quantsink: post-training quantization for transformers whose accuracy is wrecked by sink
tokens (the few tokens with massive activations that soak up attention)."""
from quantsink import observers as _observers  # noqa: F401  (registers the observers)
from quantsink.quantizers import fake as _fake  # noqa: F401  (registers the fake backend)
from quantsink.quantizers import int8 as _int8  # noqa: F401  (registers the int8 backend)
from quantsink.quantizers import torchao_backend as _torchao  # noqa: F401  (registers the torchao backend)
from quantsink.quantizers import quanto_backend as _quanto  # noqa: F401  (registers the quanto backend)
from quantsink.methods import regcache as _regcache  # noqa: F401  (registers the regcache method)
from quantsink.methods import kvsink as _kvsink  # noqa: F401  (registers the kvsink method)
from quantsink.methods import kv_static as _kv_static  # noqa: F401  (registers the kv-static method)
from quantsink import compressed_tensors_format as _compressed_tensors  # noqa: F401  (registers the export format)
from quantsink.api import QuantizationResult, evaluate_kv_cache, kv_cache, load, quantize
from quantsink.kvcache import SinkQuantizedCache
from quantsink.recipe import Recipe

__version__ = "0.1.0"
__all__ = [
    "quantize", "load", "kv_cache", "evaluate_kv_cache", "Recipe", "QuantizationResult", "SinkQuantizedCache", "__version__",
]
