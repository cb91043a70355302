"""Sink-aware static KV scales (kv-static with `kv_cache.sinks`): the predicted sinks leave the
calibrated range, and at inference they stay exact (`at_inference: exact`) or go on the
narrower grid with the rest (`quantized`, what an engine loading the export computes)."""
import pytest
import torch
from transformers import DynamicCache

import quantsink
from quantsink.errors import UserError
from quantsink.kv.arithmetic import FLOAT8_MAX
from quantsink.methods.kv_static import calibrate, install
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import planted_segments
from quantsink.testing.planted_llm_realistic import build_realistic_llama, save_realistic_llama

CALIBRATION = {"data": "bundled", "num_samples": 16, "batch_size": 8, "seed": 0, "holdout": 4, "seq_len": 128}
KVSINK_5 = {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 0.0}}


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """The realistic planted Llama: [BOS]'s post-RoPE key is the largest key of layers 2-5."""
    return save_realistic_llama(tmp_path_factory.mktemp("realistic") / "llama")


def static(sinks, granularity="per_tensor", **grid):
    return {"calibration": CALIBRATION, "kv_cache": {"scales": "static", "bits": 8, **grid, "sinks": sinks,
                                                     "keys": {"granularity": granularity},
                                                     "values": {"granularity": granularity}}}


def kv_static_of(result):
    return next(method for method in result.methods if method.name == "kv-static")


@pytest.mark.parametrize("granularity", ["per_tensor", "per_head"])
@pytest.mark.parametrize("grid", [{"type": "int"}, {"type": "float"}], ids=["int8", "fp8"])
def test_leaving_the_sinks_out_narrows_the_key_scales(realistic, granularity, grid):
    included = kv_static_of(quantsink.quantize(str(realistic), static({"method": "none"}, granularity, **grid), progress=False))
    excluded = kv_static_of(quantsink.quantize(str(realistic), static(KVSINK_5, granularity, **grid), progress=False))
    # leaving tokens out can only narrow a range; [BOS]'s key set it: 6.99 -> 5.27 (int8 and fp8 alike)
    assert bool((excluded.key_scales <= included.key_scales).all())
    largest = 127 if grid["type"] == "int" else FLOAT8_MAX
    assert float(included.key_scales.max()) * largest == pytest.approx(6.99, abs=0.01)
    assert float(excluded.key_scales.max()) * largest == pytest.approx(5.27, abs=0.01)
    # the sinks' values are not the largest: their scales stay
    assert torch.allclose(excluded.value_scales, included.value_scales, rtol=0.05)


def on_grid(states, scale, scheme):
    """(batch, tokens) bool: every channel of every head of the token is a level of the grid."""
    steps = states / scale.reshape(-1, 1, 1)
    if scheme.type == "float":
        return ((steps.to(torch.float8_e4m3fn).float() - steps).abs() <= 1e-5 * steps.abs()).all(-1).all(1)
    return ((steps - steps.round()).abs() < 1e-3).all(-1).all(1)


@pytest.mark.parametrize("grid", [{"type": "int"}, {"type": "float"}], ids=["int8", "fp8"])
@pytest.mark.parametrize("at_inference", ["exact", "quantized"])
def test_exact_sinks_are_each_rows_kvsink_top_5_and_every_other_token_is_on_the_grid(realistic, grid, at_inference):
    """Two chunks of 16 through one DynamicCache: the first chunk's call picks each row's top 5
    (budget spent), the second none; the partial forward that scores a call leaves nothing in
    the cache."""
    result = quantsink.quantize(str(realistic), static({**KVSINK_5, "at_inference": at_inference}, **grid), progress=False)
    method = kv_static_of(result)
    ids = planted_segments(result.adapter.processor, "heldout")[:4, :32]
    cache = DynamicCache()
    with torch.no_grad():
        for start in (0, 16):
            result.model(input_ids=ids[:, start : start + 16], past_key_values=cache, use_cache=True)
    for block in range(result.adapter.num_blocks):
        layer = cache.layers[block]
        assert layer.keys.shape[2] == 32
        if float(method.key_scales[block].max()) < 1e-6:
            continue  # a block whose keys are all 0 (the fixture's layer 1)
        exact = ~(on_grid(layer.keys, method.key_scales[block], method.options)
                  & on_grid(layer.values, method.value_scales[block], method.options))
        if at_inference == "quantized":
            assert not bool(exact.any())
        else:
            assert exact.sum(-1).tolist() == [5] * 4
            assert bool(exact[:, 0].all()) and not bool(exact[:, 16:].any())  # [BOS] first; none from the second chunk


def test_pfn_sinks_are_each_left_padded_rows_first_real_tokens(realistic):
    result = quantsink.quantize(str(realistic), static({"method": "pfn", "num_sinks": 2}), progress=False)
    method = kv_static_of(result)
    inputs = result.adapter.preprocess(["the value of the attribute is returned .", "return it ."])
    cache = DynamicCache()
    with torch.no_grad():
        result.model(**inputs, past_key_values=cache, use_cache=True)
        result.model(input_ids=inputs["input_ids"][:, -1:], past_key_values=cache, use_cache=True,
                     attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))
    layer, block = cache.layers[2], 2
    exact = ~(on_grid(layer.keys, method.key_scales[block], method.options)
              & on_grid(layer.values, method.value_scales[block], method.options))
    padding = int((inputs["attention_mask"][1] == 0).sum())
    assert exact[0].nonzero().flatten().tolist() == [0, 1]
    # counted from the first real token; padding is no sink (quantized with the rest, read by nothing)
    assert exact[1].nonzero().flatten().tolist() == [padding, padding + 1]


def test_exact_sinks_restore_the_logits_that_the_sinks_scales_cost(realistic):
    """Quantizing the sinks on scales calibrated without them clips [BOS]'s key; keeping them
    exact undoes it, and with every token a sink the quantized model is the full-precision one."""
    result = quantsink.quantize(str(realistic), static({**KVSINK_5, "at_inference": "quantized"}, type="float"), progress=False)
    method = kv_static_of(result)
    ids = planted_segments(result.adapter.processor, "heldout")[:4]
    full_precision, _ = build_realistic_llama()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.log_softmax(-1)

    def kl(sinks):
        scheme = method.options
        install(result.adapter, method.key_scales, method.value_scales, scheme.bits, scheme.type, scheme.sinks.model_copy(update=sinks))
        quantized = logits(result.model)
        return float(torch.nn.functional.kl_div(quantized, reference, log_target=True, reduction="none").sum(-1).mean())

    reference = logits(full_precision.eval())
    clipped, exact = kl({"at_inference": "quantized"}), kl({"at_inference": "exact"})
    assert exact < clipped / 10  # measured (4 held-out segments, fp8 per tensor): 0.0012 against 0.0225
    assert kl({"at_inference": "exact", "num_sinks": 128}) == 0.0


@pytest.mark.parametrize("kv_cache, message", [
    ({"scales": "static", "type": "float", "bits": 4}, "type float is fp8 (e4m3), 8 bits, got bits 4: set bits 8, or type int"),
    ({"type": "float", "bits": 8}, "type float needs scales: static"),
    ({"scales": "static", "type": "float", "bits": 8, "observer": "mse"}, "type float takes minmax or percentile"),
    ({"scales": "static", "sinks": {"at_inference": "quantized"}}, "set a sinks.method (pfn or kvsink) or remove at_inference"),
    ({"bits": 4, "sinks": {"method": "kvsink", "at_inference": "quantized"}}, "sinks.at_inference quantized applies to static scales"),
    ({"scales": "static", "sinks": {"method": "kvsink", "profile": {"prefill": "hold"}}},
     "static scales decide each forward call's sinks as it runs"),
    ({"scales": "static", "sinks": {"method": "kvsink", "at_inference": "always"}}, "kv_cache.sinks.at_inference"),
    ({"scales": "static", "type": "fp8"}, "kv_cache.type"),
])
def test_a_malformed_static_scheme_is_refused_in_one_line(kv_cache, message):
    with pytest.raises(UserError) as error:
        Recipe.from_dict({"kv_cache": kv_cache})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_kvsink_sinks_without_the_predictor_are_refused(realistic):
    adapter = resolve(str(realistic))
    scheme = Recipe.from_dict(static(KVSINK_5)).kv_cache
    with pytest.raises(UserError) as error:
        calibrate(adapter, [adapter.preprocess(["the end of it."])], scheme, progress=False)
    message = str(error.value)
    assert "needs the kvsink predictor" in message and "run the kvsink method first" in message and "\n" not in message
