"""A causal LM quantized W8A8 with a static KV-cache scheme (`kv-static`) and exported as
compressed-tensors: transformers' `from_pretrained` loads it, quantizes the keys and values where
and as quantsink does, and gives quantsink's logits; `quantsink.load` gives them exactly."""
import json

import pytest
import torch
from compressed_tensors.modeling.kvcache import QuantizedKVCache
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as compressed_tensors_fake_quantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import quantsink
from quantsink.kv.arithmetic import fake_quantize_float8, fake_quantize_signed_grid
from quantsink.data import load_samples
from quantsink.errors import CheckpointError, UserError
from quantsink.models import save_model
from quantsink.quantizers import functional
from quantsink.quantizers import kernels
from quantsink.testing.planted_llm_realistic import save_realistic_llama
from quantsink.testing.tiny import TINY_CAUSAL_LMS, build_tiny, build_tiny_causal_lm

from conftest import KV_SCHEME_LOADS, kv_scheme_loads

CALIBRATION = {"data": "bundled", "num_samples": 8, "batch_size": 4, "seed": 0, "holdout": 4, "seq_len": 48}
LAYERS = 2  # build_tiny_causal_lm's default
KV_HEADS = 2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_model(build_tiny_causal_lm("llama"), tmp_path_factory.mktemp("tiny") / "llama")


def recipe(backend="fake", export="compressed-tensors", **kv_static):
    """W8A8 (per-channel weights, per-tensor static inputs, lm_head included: the tiny model's
    output projection is not tied to its embeddings) with static KV scales (kv-static), 8-bit
    unless told."""
    return {"name": "llm", "calibration": CALIBRATION, "kv_cache": {"scales": "static", "bits": 8, **kv_static},
            "quantization": {"backend": backend}, "export": {"format": export}}


def holdout(adapter):
    samples = load_samples("bundled", "text", CALIBRATION["num_samples"], CALIBRATION["holdout"], seed=0,
                           seq_len=CALIBRATION["seq_len"])
    return adapter.preprocess(samples.holdout, max_length=CALIBRATION["seq_len"])


def logits(model, inputs):
    """Logits of the real tokens (rows are left-padded), and the filled KV cache."""
    with torch.no_grad():
        output = model(**inputs)
    return output.logits[inputs["attention_mask"].bool()], output.past_key_values


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def signed_qrange(bits, symmetric):
    """compressed-tensors' integer range: symmetric ones reach -2^(b-1)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def disable_kv_quantization(hf_model):
    for layer in hf_model.model.layers:
        layer.self_attn.quantization_enabled = False


@pytest.mark.slow
@kv_scheme_loads
@pytest.mark.parametrize("backend, kv_static, scale_shape", [
    ("fake", {}, (1,)),
    ("int8", {}, (1,)),
    ("fake", {"bits": 4, "keys": {"granularity": "per_head"}, "values": {"granularity": "per_head"}}, (KV_HEADS, 1, 1)),
], ids=["fake", "int8", "fake-4bit-per-head"])
def test_w8a8_with_a_kv_scheme_loads_in_transformers_with_quantsinks_logits(
    tiny_llama, tmp_path, monkeypatch, backend, kv_static, scale_shape
):
    result = quantsink.quantize(str(tiny_llama), recipe(backend, **kv_static), progress=False)
    out = result.save(tmp_path / "out")
    method = result.methods[0]
    bits = kv_static.get("bits", 8)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    strategy = "tensor" if scale_shape == (1,) else "attn_head"
    assert config["kv_cache_scheme"].items() >= {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
                                                 "dynamic": False}.items()
    assert config["ignore"] == []  # every Linear, lm_head included, is W8A8
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for layer in range(LAYERS):
            for kv, scales in (("k", method.key_scales), ("v", method.value_scales)):
                stored = f.get_tensor(f"model.layers.{layer}.self_attn.{kv}_scale")
                assert stored.shape == scale_shape and torch.equal(stored.flatten(), scales[layer])

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for layer in range(LAYERS):
        attention = hf.model.layers[layer].self_attn
        assert isinstance(attention.kv_cache, QuantizedKVCache)  # compressed-tensors' hook is in place
        assert torch.equal(attention.k_scale.flatten(), method.key_scales[layer])

    inputs = holdout(result.adapter)
    ours, _ = logits(result.model, inputs)
    theirs, _ = logits(hf, inputs)
    # W8A8 static inputs that the quantized layers before them push beyond the range calibrated in
    # full precision clip at -128 in compressed-tensors and at -127 in quantsink (8-bit KV: one
    # o_proj input of the tiny model reaches -128.5 steps), and the tiny model's final norm
    # magnifies its small residual stream. Measured: relative error 6.7e-3 (max |difference|
    # 0.0078 for logits up to 0.8) with 8-bit KV, 0 with 4-bit.
    assert relative_error(theirs, ours) < 1e-2
    # and that clip is all there is: on compressed-tensors' activation grid quantsink's logits are
    # the loaded model's to float rounding (measured: equal for fake, 2.7e-7 apart for int8)
    with monkeypatch.context() as patch:
        for module in (functional, kernels):
            patch.setattr(module, "qrange", signed_qrange)
        on_its_grid, _ = logits(result.model, inputs)
    assert (theirs - on_its_grid).abs().max() < 1e-6
    disable_kv_quantization(hf)
    without_kv, _ = logits(hf, inputs)
    assert relative_error(without_kv, ours) > 1e-2  # the KV scales are in force: 1.8e-2 (8-bit), 7.4e-2 (4-bit)
    assert torch.equal(logits(quantsink.load(out), inputs)[0], ours)


@kv_scheme_loads
def test_the_loaded_model_caches_the_keys_and_values_quantsink_caches(tiny_llama, tmp_path):
    """Post-RoPE keys and values on the grid of each layer's scale, in both models; the first
    layer (whose inputs the W8A8 layers see alike) caches bit for bit the same ones."""
    result = quantsink.quantize(str(tiny_llama), recipe(), progress=False)
    out = result.save(tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = holdout(result.adapter)
    _, ours = logits(result.model, inputs)
    _, theirs = logits(hf, inputs)
    disable_kv_quantization(hf)
    _, unquantized = logits(hf, inputs)
    method = result.methods[0]

    def on_grid(states, scale):
        steps = states / scale
        return bool(((steps - steps.round()).abs() < 1e-3).all() and steps.min() >= -128 and steps.max() <= 127)

    for layer in range(LAYERS):
        for cached, scale in (("keys", method.key_scales[layer]), ("values", method.value_scales[layer])):
            assert on_grid(getattr(ours.layers[layer], cached), scale)
            assert on_grid(getattr(theirs.layers[layer], cached), scale)
            assert not on_grid(getattr(unquantized.layers[layer], cached), scale)
    assert torch.equal(ours.layers[0].keys, theirs.layers[0].keys)
    assert torch.equal(ours.layers[0].values, theirs.layers[0].values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, strategy, scale", [
    (8, "tensor", torch.tensor([0.013])),
    (4, "attn_head", torch.tensor([0.05, 0.11]).reshape(2, 1, 1)),
])
def test_the_rounding_is_compressed_tensors_rounding(dtype, bits, strategy, scale):
    torch.manual_seed(0)
    states = torch.randn(3, 2, 17, 16) * scale.max() * 2 ** (bits - 1)  # beyond the grid at both ends
    states[0, :, 0, :4] = scale.reshape(-1, 1) * torch.tensor([0.5, -2.5, -128.5, 127.5])  # ties and the ends
    states = states.to(dtype)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, dynamic=False)
    expected = compressed_tensors_fake_quantize(states, scale.to(dtype), None, args)
    assert torch.equal(fake_quantize_signed_grid(states, scale, bits), expected)
    assert expected.dtype == dtype and (expected / scale.to(dtype)).min() == -(2 ** (bits - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy, scale", [
    ("tensor", torch.tensor([0.013])),
    ("attn_head", torch.tensor([0.05, 0.11]).reshape(2, 1, 1)),
])
def test_the_fp8_rounding_is_compressed_tensors_rounding(dtype, strategy, scale):
    torch.manual_seed(0)
    states = torch.randn(3, 2, 17, 16) * scale.max() * 600 * torch.logspace(-6, 0, 16)  # subnormals to beyond 448
    # ties between e4m3 neighbours (round to even), the largest level and past it
    states[0, :, 0, :4] = scale.reshape(-1, 1) * torch.tensor([1.0625, -17.0, 448.0, -464.0])
    states = states.to(dtype)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False)
    expected = compressed_tensors_fake_quantize(states, scale.to(dtype), None, args)
    assert torch.equal(fake_quantize_float8(states, scale), expected)
    steps = (expected / scale.to(dtype)).float()[0, :, 0, :4]
    assert expected.dtype == dtype
    assert torch.allclose(steps, torch.tensor([1.0, -16.0, 448.0, -448.0]), rtol=1e-2)  # ties to even, clamped


@pytest.fixture(scope="module")
def realistic_llama(tmp_path_factory):
    """The realistic planted Llama: [BOS]'s post-RoPE key is the largest key of its layers 2-5."""
    return save_realistic_llama(tmp_path_factory.mktemp("realistic") / "llama")


KVSINK_5 = {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 0.0}}


@kv_scheme_loads
@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
def test_an_fp8_sink_aware_kv_scheme_loads_in_transformers_with_quantsinks_logits(realistic_llama, tmp_path, granularity):
    """Scales calibrated without the kvsink sinks, and `at_inference: quantized`: what a loader,
    which knows nothing of sinks, computes; transformers gives quantsink's logits."""
    kv = {"type": "float", "keys": {"granularity": granularity}, "values": {"granularity": granularity},
          "sinks": {**KVSINK_5, "at_inference": "quantized"}}
    result = quantsink.quantize(str(realistic_llama), recipe(**kv), progress=False)
    out = result.save(tmp_path / "out")
    method = next(method for method in result.methods if method.name == "kv-static")
    profile = next(method.profile for method in result.methods if method.name == "kvsink")

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    strategy = "tensor" if granularity == "per_tensor" else "attn_head"
    assert config["kv_cache_scheme"].items() >= {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                                                 "dynamic": False}.items()
    exact = json.loads((out / "quantsink.json").read_text())["kv_cache_scales"]["exact_tokens"]
    assert exact.items() >= {"method": "kvsink", "num_sinks": 5, "at_inference": "quantized"}.items()
    assert exact["predictor"] == {"emergence_layer": profile.emergence_layer, "channels": profile.channels,
                                  "score": "channel", "threshold": 0.0}
    assert "clips them" in exact["warning"]

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for layer in range(result.adapter.num_blocks):
        attention = hf.model.layers[layer].self_attn
        assert isinstance(attention.kv_cache, QuantizedKVCache)
        assert torch.equal(attention.k_scale.flatten(), method.key_scales[layer])
        assert torch.equal(attention.v_scale.flatten(), method.value_scales[layer])
    inputs = holdout(result.adapter)
    ours, _ = logits(result.model, inputs)
    theirs, _ = logits(hf, inputs)
    # no W8A8 input of this model reaches -128 steps (the one place the two grids differ):
    # measured identical, per tensor and per head
    assert (theirs - ours).abs().max() < 1e-6
    disable_kv_quantization(hf)
    without_kv, _ = logits(hf, inputs)
    assert relative_error(without_kv, theirs) > 1e-2  # the fp8 KV scales are in force: 2.0e-2 (both granularities)


@kv_scheme_loads
def test_sinks_kept_exact_reload_in_quantsink_and_not_in_an_engine(realistic_llama, tmp_path, caplog):
    """The default, `at_inference: exact`: `quantsink.load` keeps the predicted sinks exact as the
    in-memory model does; transformers quantizes them (the export warns so) and differs."""
    kv = {"type": "float", "sinks": KVSINK_5}
    result = quantsink.quantize(str(realistic_llama), recipe(**kv), progress=False)
    with caplog.at_level("WARNING", logger="quantsink.methods.kv_static"):
        out = result.save(tmp_path / "out")
    assert "transformers, vLLM and other compressed-tensors loaders quantize them too" in caplog.text
    assert json.loads((out / "quantsink.json").read_text())["kv_cache_scales"]["exact_tokens"]["at_inference"] == "exact"
    inputs = holdout(result.adapter)
    ours, _ = logits(result.model, inputs)
    assert torch.equal(logits(quantsink.load(out), inputs)[0], ours)
    theirs, _ = logits(AutoModelForCausalLM.from_pretrained(out).eval(), inputs)
    assert relative_error(theirs, ours) > 1e-2  # measured 2.3e-2: [BOS]'s key clips on the narrower grid


@pytest.mark.slow
@pytest.mark.parametrize("backend, export", [
    ("fake", "fake-quant"), ("int8", "int8"), pytest.param("int8", "compressed-tensors", marks=kv_scheme_loads),
])
def test_load_reproduces_the_in_memory_logits(tiny_llama, tmp_path, backend, export):
    result = quantsink.quantize(str(tiny_llama), recipe(backend, export), progress=False)
    out = result.save(tmp_path / "out")
    inputs = holdout(result.adapter)
    loaded = quantsink.load(out)
    assert torch.equal(logits(loaded, inputs)[0], logits(result.model, inputs)[0])
    # the scales live in methods.safetensors, not in the model's state
    assert not any(key.endswith(("k_scale", "v_scale")) for key in loaded.state_dict())


def test_mis_shaped_scales_are_refused_on_load(tiny_llama, tmp_path):
    out = quantsink.quantize(str(tiny_llama), recipe(export="fake-quant"), progress=False).save(tmp_path / "out")
    tensors = load_file(out / "methods.safetensors")
    tensors["kv-static/key_scales"] = tensors["kv-static/key_scales"][:1]
    save_file(tensors, out / "methods.safetensors")
    with pytest.raises(CheckpointError) as error:
        quantsink.load(out)
    message = str(error.value)
    assert "kv-static/key_scales must be finite positive (2, 1) scales, found (1, 1)" in message and "\n" not in message


@pytest.mark.parametrize("model_type", TINY_CAUSAL_LMS)
def test_transform_kv_sees_post_rope_keys_with_and_without_a_cache(model_type):
    adapter = build_tiny_causal_lm(model_type)
    inputs = adapter.preprocess(["Return the value of the attribute.", "The default is"])
    with torch.no_grad():
        expected = adapter.model(**inputs)
    seen = []

    def record(keys, values):
        seen.append((keys, values))
        return keys, values

    handle = adapter.transform_kv(1, record)
    with torch.no_grad():
        cached = adapter.model(**inputs)
        uncached = adapter.model(**inputs, use_cache=False).logits
    handle.remove()
    assert torch.equal(cached.logits, expected.logits) and torch.equal(uncached, expected.logits)
    # what the cache keeps (keys after RoPE) is what the transform saw, in both calls
    for keys, values in seen:
        assert torch.equal(keys, expected.past_key_values.layers[1].keys)
        assert torch.equal(values, expected.past_key_values.layers[1].values)
    assert len(seen) == 2 and seen[0][0].shape[1] == adapter.num_key_value_heads

    adapter.transform_kv(1, lambda keys, values: (keys, torch.zeros_like(values)))
    with torch.no_grad():
        silenced = adapter.model(**inputs, use_cache=False).logits
    assert not torch.equal(silenced, expected.logits)  # without a cache the attention uses what it gives


def test_kv_static_refuses_a_model_without_a_kv_cache():
    with pytest.raises(UserError) as error:
        quantsink.quantize(build_tiny("hf-clip").model, {"calibration": {"num_samples": 2, "holdout": 1, "batch_size": 2},
                                                        "kv_cache": {"scales": "static"}}, progress=False)
    message = str(error.value)
    assert message.startswith("kv-static quantizes a causal LM's KV cache;") and "(hf-clip) has none" in message
    assert "\n" not in message


@pytest.mark.skipif(KV_SCHEME_LOADS, reason="this compressed-tensors hooks attentions that take the cache as `cache`")
def test_a_kv_scheme_for_attentions_taking_the_new_cache_keyword_is_refused(tiny_llama, tmp_path):
    """transformers 5.24 hands attentions the cache as `cache`, which compressed-tensors 0.20 does
    not hook: a loader would keep the scales and never quantize keys and values, so the export
    refuses, naming both versions."""
    with pytest.raises(UserError) as error:
        quantsink.quantize(str(tiny_llama), recipe(), progress=False).save(tmp_path / "out")
    message = str(error.value)
    assert "model.layers.0.self_attn is not an attention it recognises" in message and "\n" not in message
    assert "takes the cache as 'cache' under transformers 5." in message and "compressed-tensors 0." in message
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_refuses_kv_scales_for_attentions_it_does_not_hook(tmp_path):
    """GPT-NeoX's fused query_key_value and `layer_past` are not what compressed-tensors hooks: a
    loader would skip its KV scales, so the export refuses; quantsink's own formats keep them."""
    source = save_model(build_tiny_causal_lm("gpt_neox"), tmp_path / "neox")
    result = quantsink.quantize(str(source), recipe(), progress=False)
    with pytest.raises(UserError) as error:
        result.save(tmp_path / "out")
    message = str(error.value)
    assert "gpt_neox.layers.0.attention is not an attention it recognises" in message and "\n" not in message
    assert "use export.format int8 or fake-quant" in message and not (tmp_path / "out").exists()
