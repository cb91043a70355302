"""No silent no-ops: what methods install on a model proves, by a probe forward, that it runs.
A layer that takes the KV cache under a keyword quantsink does not know, or a hook that never
fires, fails the install with one line naming the model class, the transformers version and the
part; the model is left as it was."""
import inspect

import pytest
import torch
import transformers

import quantsink
from transformers.cache_utils import DynamicCache

from quantsink.errors import UserError
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods import kv_static, kvsink
from quantsink.methods.regcache import Registers, RegCacheSettings
from quantsink.methods.regcache import install as install_regcache
from quantsink.models.handles import installed
from quantsink.models.probe import NotRunError
from quantsink.testing.tiny import TINY_CAUSAL_LMS, build_tiny, build_tiny_causal_lm

SCALES = torch.full((2, 1), 0.05)  # (blocks, groups): per-tensor K/V scales of the 2-layer tiny LMs
PROFILE = kvsink.SinkProfile(emergence_layer=0, channels=[3], threshold=1e-3, scale=1.0, peak=1.0, layer_ratios=[1.0, 1.0])


def logits(adapter, inputs, cache=None):
    with torch.no_grad():
        extra = {} if cache is None else {adapter.call_cache_keyword: cache, "use_cache": True}
        return adapter.model(**inputs, **extra).logits


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_cache_keyword_is_read_from_the_signatures():
    adapter = build_tiny_causal_lm("llama")
    expected = "cache" if "cache" in inspect.signature(adapter.attention(0).forward).parameters else "past_key_values"
    assert adapter.call_cache_keyword == expected
    assert build_tiny_causal_lm("gpt_neox").cache_of_call({"layer_past": "the cache"}) == "the cache"


@pytest.mark.parametrize("model_type", TINY_CAUSAL_LMS)
def test_zeroed_keys_and_values_change_the_logits(model_type):
    """The regression of transformers 5.24: with the cache under its new keyword, transform_kv was
    skipped silently and zeroing every K/V changed the logits by 0.0."""
    adapter = build_tiny_causal_lm(model_type)
    inputs = adapter.preprocess(["the cat sat on the mat ."])
    for cache in (None, DynamicCache()):
        expected = logits(adapter, inputs, cache)
        handles = [adapter.transform_kv(block, lambda k, v: (torch.zeros_like(k), torch.zeros_like(v)))
                   for block in range(adapter.num_blocks)]
        zeroed = logits(adapter, inputs, None if cache is None else DynamicCache())
        for handle in handles:
            handle.remove()
        assert (zeroed - expected).abs().max() > 1e-3
        assert torch.equal(logits(adapter, inputs, None if cache is None else DynamicCache()), expected)


def test_kv_static_quantizes_the_keys_and_values_it_is_installed_on():
    adapter = build_tiny_causal_lm("llama")
    inputs = adapter.preprocess(["the cat sat on the mat ."])
    expected = logits(adapter, inputs)
    handles = kv_static.install(adapter, SCALES, SCALES, bits=2)
    assert (logits(adapter, inputs) - expected).abs().max() > 1e-3
    handles.remove()
    assert torch.equal(logits(adapter, inputs), expected)


def rename_cache_keyword(adapter, monkeypatch):
    """Every attention takes the cache under a keyword no transformers release used."""
    for block in range(adapter.num_blocks):
        attention = adapter.attention(block)
        original = attention.forward

        def forward(hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, original=original, **kwargs):
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs)

        monkeypatch.setattr(attention, "forward", forward)


def test_an_attention_taking_the_cache_under_an_unknown_keyword_is_refused(monkeypatch):
    adapter = build_tiny_causal_lm("llama")
    rename_cache_keyword(adapter, monkeypatch)
    with pytest.raises(UserError) as error:
        kv_static.install(adapter, SCALES, SCALES, bits=8)
    message = one_line(error)
    assert message.startswith(f"LlamaAttention.forward (transformers {transformers.__version__}) takes the KV cache under none of")
    assert "kv_store" in message


def test_a_kv_transform_that_never_runs_fails_the_install_and_is_taken_off(monkeypatch):
    """An attention that computes without ever handing its keys and values to the cache object."""
    adapter = build_tiny_causal_lm("llama")
    for block in range(adapter.num_blocks):
        attention = adapter.attention(block)
        original = attention.forward
        keyword = adapter._attention_cache_keyword

        def forward(*args, original=original, keyword=keyword, **kwargs):
            kwargs[keyword] = None
            return original(*args, **kwargs)

        monkeypatch.setattr(attention, "forward", forward)
    with pytest.raises(NotRunError) as error:
        kv_static.install(adapter, SCALES, SCALES, bits=8)
    message = one_line(error)
    assert message.startswith("the kv-static K/V quantization of decoder block 0, the kv-static K/V quantization of "
                              f"decoder block 1 did not run in a probe forward of LlamaForCausalLM (transformers {transformers.__version__})")
    assert all(not adapter.attention(block)._forward_pre_hooks for block in range(adapter.num_blocks))


def test_a_sink_predictor_that_never_sees_the_cache_fails_the_install(monkeypatch):
    """What transformers 5.24 did to the predictor: its hook read the cache under the old keyword,
    found none, and never offered a sink."""
    adapter = build_tiny_causal_lm("llama")
    monkeypatch.setitem(adapter.__dict__, "_block_cache_keyword", "layer_past")
    with pytest.raises(NotRunError) as error:
        kvsink.install(adapter, PROFILE)
    assert one_line(error).startswith("the kvsink sink predictor on decoder block 0 did not run in a probe forward of LlamaForCausalLM")
    assert not adapter.blocks()[0]._forward_hooks and "kvsink" not in installed(adapter.model)


def test_the_sink_predictor_offers_sinks_once_installed():
    adapter = build_tiny_causal_lm("llama")
    kvsink.install(adapter, PROFILE)
    cache = kvsink.SinkQuantizedCache(KVCacheScheme(group_size=32, sinks={"method": "kvsink", "num_sinks": 2}))
    logits(adapter, adapter.preprocess(["the cat sat on the mat ."]), cache)
    assert int((cache.rows.sink_positions >= 0).sum()) == 2


def regcache_on(adapter, delete_tokens=2):
    heads = adapter.model.config.num_attention_heads
    head_dim = adapter.model.config.hidden_size // heads
    registers = Registers(torch.randn(adapter.num_blocks, heads, head_dim), torch.randn(adapter.num_blocks, heads, head_dim), 0)
    settings = RegCacheSettings(sensitive_layer=1, prefix_start=1, num_registers=2, delete_tokens=delete_tokens)
    return install_regcache(adapter, settings, registers)


def test_regcache_installs_and_comes_off_exactly():
    adapter = build_tiny("hf-clip")
    inputs = adapter.probe_inputs()
    expected = adapter.embed(inputs)
    regcache = regcache_on(adapter)
    assert not torch.allclose(adapter.embed(inputs), expected)
    regcache.remove()
    assert torch.equal(adapter.embed(inputs), expected)


def test_a_register_prefix_the_attention_never_reads_fails_the_install(monkeypatch):
    """A model whose attention kernel cannot be switched to quantsink's edited one."""
    adapter = build_tiny("hf-clip")
    inputs = adapter.probe_inputs()
    expected = adapter.embed(inputs)
    monkeypatch.setattr(adapter.model, "set_attn_implementation", lambda _kernel: None)
    with pytest.raises(NotRunError) as error:
        regcache_on(adapter, delete_tokens=0)
    assert one_line(error).startswith("the register prefix of block 1, the register prefix of block 2, the register "
                                      "prefix of block 3 did not run in a probe forward of CLIPVisionModelWithProjection")
    assert torch.equal(adapter.embed(inputs), expected)


def test_a_targeted_linear_the_model_never_calls_fails_calibration():
    """A quantizer replaces every Linear the recipe targets; one the forward never reaches would
    ship unquantized and uncalibrated."""
    adapter = build_tiny("hf-clip")
    adapter.model.vision_model.unused = torch.nn.Linear(64, 64)
    recipe = {"name": "probe", "calibration": {"data": "bundled", "num_samples": 2, "batch_size": 2, "holdout": 2}}
    with pytest.raises(NotRunError) as error:
        quantsink.quantize(adapter.model, recipe, progress=False)
    assert one_line(error).startswith("quantized module vision_model.unused did not run in the calibration pass of "
                                      "CLIPVisionModelWithProjection")
    assert one_line(error).endswith("the model never calls it; add it to quantization.ignore")


# --- one install idiom: installing twice replaces, removing restores the outputs exactly ----
def test_kv_static_installed_twice_replaces_and_comes_off_exactly():
    adapter = build_tiny_causal_lm("llama")
    inputs = adapter.preprocess(["the cat sat on the mat ."])
    expected = logits(adapter, inputs)
    kv_static.install(adapter, SCALES, SCALES, bits=2)
    once = logits(adapter, inputs)
    handles = kv_static.install(adapter, SCALES, SCALES, bits=2)
    assert torch.equal(logits(adapter, inputs), once)
    assert all(len(adapter.attention(block)._forward_pre_hooks) == 1 for block in range(adapter.num_blocks))
    handles.remove()
    assert torch.equal(logits(adapter, inputs), expected) and not installed(adapter.model)


def test_kvsink_installed_twice_replaces_and_comes_off_exactly():
    adapter = build_tiny_causal_lm("llama")
    inputs = adapter.preprocess(["the cat sat on the mat ."])
    expected = logits(adapter, inputs)
    sink_cache = lambda: kvsink.SinkQuantizedCache(KVCacheScheme(bits=2, group_size=4, residual_length=0,
                                                                 sinks={"method": "kvsink", "num_sinks": 2}))
    kvsink.install(adapter, PROFILE)
    once = logits(adapter, inputs, sink_cache())
    handles = kvsink.install(adapter, PROFILE)
    assert torch.equal(logits(adapter, inputs, sink_cache()), once)
    assert len(adapter.blocks()[0]._forward_hooks) == 1
    handles.remove()
    assert torch.equal(logits(adapter, inputs), expected)
    assert not adapter.blocks()[0]._forward_hooks and not installed(adapter.model)


def test_regcache_installed_twice_replaces_and_comes_off_exactly():
    adapter = build_tiny("hf-clip")
    inputs = adapter.probe_inputs()
    expected = adapter.embed(inputs)
    torch.manual_seed(0)
    regcache_on(adapter)
    once = adapter.embed(inputs)
    torch.manual_seed(0)
    regcache = regcache_on(adapter)
    assert torch.equal(adapter.embed(inputs), once)
    assert len(adapter.blocks()[1]._forward_pre_hooks) == 1  # one deletion, not two
    regcache.remove()
    assert torch.equal(adapter.embed(inputs), expected) and not installed(adapter.model)


def test_importing_quantsink_writes_nothing_into_transformers_registries():
    import subprocess
    import sys

    code = ("import quantsink.models.hf, quantsink.pipeline; "
            "from transformers import AttentionInterface; "
            "assert not [k for k in AttentionInterface._global_mapping if k.startswith('quantsink')]")
    subprocess.run([sys.executable, "-c", code], check=True)
