"""What the tests share: the tiny saved models several files quantize, and the skip for
compressed-tensors' KV-cache hooks. The slowest tests are marked `slow`: `pytest -m "not slow"`
runs the rest."""
import pytest
from compressed_tensors.quantization import is_cached_attention_module

from quantsink.models import save_model
from quantsink.testing.tiny import build_tiny, build_tiny_causal_lm

# compressed-tensors hooks a checkpoint's kv_cache_scheme only onto attentions whose forward
# takes `past_key_values`; under transformers 5.24, which renamed it `cache`, quantsink refuses
# that export (tested) and the tests that load one in transformers have nothing to load.
KV_SCHEME_LOADS = is_cached_attention_module(build_tiny_causal_lm("llama").model.model.layers[0].self_attn)
kv_scheme_loads = pytest.mark.skipif(
    not KV_SCHEME_LOADS, reason="this compressed-tensors does not hook attentions that take the cache as `cache`"
)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP saved as a model folder: the source the backend and export tests quantize (read only)."""
    folder = tmp_path_factory.mktemp("tiny") / "clip"
    save_model(build_tiny("hf-clip"), folder)
    return folder
