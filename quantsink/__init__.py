"""quantsink: post-training quantization for transformers whose accuracy is wrecked by sink
tokens (the few tokens with massive activations that soak up attention)."""
from quantsink import observers as _observers  # noqa: F401  (registers the observers)
from quantsink.quantizers import fake as _fake  # noqa: F401  (registers the fake backend)
from quantsink.api import QuantizationResult, load, quantize
from quantsink.recipe import Recipe

__version__ = "0.1.0"
__all__ = ["quantize", "load", "Recipe", "QuantizationResult", "__version__"]
