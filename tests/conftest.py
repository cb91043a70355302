"""What the tests share."""
import pytest
from compressed_tensors.quantization import is_cached_attention_module

from quantsink.testing.tiny import build_tiny_causal_lm

# compressed-tensors hooks a checkpoint's kv_cache_scheme only onto attentions whose forward
# takes `past_key_values`; under transformers 5.24, which renamed it `cache`, quantsink refuses
# that export (tested) and the tests that load one in transformers have nothing to load.
KV_SCHEME_LOADS = is_cached_attention_module(build_tiny_causal_lm("llama").model.model.layers[0].self_attn)
kv_scheme_loads = pytest.mark.skipif(
    not KV_SCHEME_LOADS, reason="this compressed-tensors does not hook attentions that take the cache as `cache`"
)
