"""`keys.ranges: calibrated` (KVQuant's offline per-channel keys): the cache quantizes each key
onto its channel's calibrated range as it leaves the window; kv-static calibrates the ranges on
the tokens the cache would quantize (pre-RoPE when asked, padding and sinks left out); a
quantized model carries them through save and load, at 2, 3 and 4 bits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantsink
from quantsink.errors import UserError
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.arithmetic import largest_magnitudes, quantize_in_range
from quantsink.kv.attach import build_kv_cache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.methods.kv_static import calibrate_key_ranges
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import planted_segments, save_planted_llama
from quantsink.testing.tiny import build_tiny_causal_lm

RECIPE = Path(__file__).parents[2] / "recipes" / "planted-llama-kv2-kvsink.yaml"
CALIBRATED = {"granularity": "per_channel", "pre_rope": True, "ranges": "calibrated"}


def test_keys_are_quantized_onto_their_channel_range_as_they_leave_the_window():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 5, 8, generator=generator) * 2
    keys[0, 1, 3, 2] = 50.0
    low, high = torch.full((2, 8), -1.0), torch.linspace(0.5, 2.0, 16).reshape(2, 8)
    scheme = KVCacheScheme(bits=2, group_size=16, residual_length=0, outlier_fraction=0.05,
                           keys={"granularity": "per_channel", "ranges": "calibrated"})
    cache = SinkQuantizedCache(scheme, key_ranges=torch.stack([low, high]).unsqueeze(0))
    cache.update(keys, keys, 0)
    layer = cache.layers[0]
    assert layer.quantized_keys.tolist() == [5]  # no group of 16 tokens to wait for
    # 5% of a token's 16 entries: 1 outlier each, the entry farthest out of its channel's range for its width
    spread = ((2 * keys - (low + high)[:, None]).abs() / (high - low)[:, None]).transpose(1, 2).flatten(2)
    outliers = largest_magnitudes(spread, 1).reshape(1, 5, 2, 8).transpose(1, 2)
    assert bool(outliers[0, 1, 3, 2]) and int(outliers.sum()) == 5
    assert torch.equal(layer.keys, quantize_in_range(keys, low[:, None], high[:, None], bits=2, outliers=outliers))
    channels = layer.keys.masked_fill(outliers, 0.0).transpose(2, 3).reshape(16, 5)  # each on its range's 2-bit grid
    for channel, bound in zip(channels, torch.stack([low, high], -1).reshape(16, 2)):
        assert len(set(channel.tolist()) - {0.0}) <= 4 and bool(((channel >= bound[0] - 1e-6) & (channel <= bound[1] + 1e-6)).all())
    memory = cache.memory()
    assert memory.scales_and_offsets == (16 + 5 * 2) * 2 * 2  # one range per key channel; values: 2 groups per token
    assert memory.outliers == (5 + 5) * 4  # 1 per token vector, keys and values, fp16 value + 2-byte index


def test_calibrated_ranges_are_required_checked_and_refused_where_they_cannot_run():
    scheme = KVCacheScheme(bits=2, keys={"ranges": "calibrated"})
    with pytest.raises(UserError, match="key ranges kv-static calibrated"):
        SinkQuantizedCache(scheme)
    cache = SinkQuantizedCache(scheme.model_copy(update={"residual_length": 0, "group_size": 8}),
                               key_ranges=torch.zeros(1, 2, 3, 8))
    with pytest.raises(UserError, match=r"\(2, 2, 8\) key range per layer, found \(2, 3, 8\)"):
        cache.update(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 0)
    for refused, message in (
        ({"keys": {"granularity": "per_token", "ranges": "calibrated"}}, "set keys.granularity per_channel"),
        ({"backend": "transformers-quanto", "keys": {"ranges": "calibrated"}}, "has no keys.ranges calibrated"),
        ({"scales": "static", "keys": {"granularity": "per_tensor", "ranges": "calibrated"}}, "keys.ranges applies to dynamic"),
        ({"scales": "static", "keys": {"granularity": "per_channel", "pre_rope": True}}, "keys.ranges calibrated\\)"),
    ):
        with pytest.raises(ValueError, match=message):
            KVCacheScheme(bits=2, **refused)


def test_kv_static_observes_the_pre_rope_keys_of_the_tokens_the_cache_quantizes():
    adapter = build_tiny_causal_lm("llama", layers=2)
    model = adapter.model
    ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: never observed, and the positions count real tokens only
    scheme = KVCacheScheme(bits=2, keys=CALIBRATED, sinks={"method": "pfn", "num_sinks": 1})
    ranges = calibrate_key_ranges(adapter, [{"input_ids": ids, "attention_mask": mask}], scheme, progress=False)
    captured = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, output: captured.append(output))
             for layer in model.model.layers]
    try:
        with torch.no_grad():  # k_proj's output is the key before RoPE
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    finally:
        for hook in hooks:
            hook.remove()
    stream = mask.bool() & (mask.cumsum(-1) > 1)  # pfn-1: each row's first real token is a sink
    heads = adapter.num_key_value_heads
    for block, output in enumerate(captured):
        keys = output.reshape(2, 12, heads, -1)[stream]
        assert torch.allclose(ranges[block, 0], keys.amin(0), atol=1e-5)
        assert torch.allclose(ranges[block, 1], keys.amax(0), atol=1e-5)


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    return save_planted_llama(tmp_path_factory.mktemp("planted") / "planted-llama")


def calibrated_recipe(sinks: dict) -> Recipe:
    data = Recipe.from_yaml(RECIPE).to_dict()
    data["kv_cache"].update(keys=CALIBRATED, sinks=sinks)
    return Recipe.from_dict(data)


def test_calibrated_pre_rope_keys_at_2_to_4_bits_survive_save_and_load(planted_folder, tmp_path):
    # every planted sink kept (the fixture has up to 18 per segment): the ranges are the ordinary keys'
    every_sink = {"method": "kvsink", "num_sinks": 24, "profile": {"min_score": 100.0}}
    result = quantsink.quantize(str(planted_folder), calibrated_recipe(every_sink), progress=False)
    segments = planted_segments(result.adapter.processor, "heldout")[:8]

    def kl(quantized, bits: int) -> float:
        cache = build_kv_cache(quantized.recipe.kv_cache.model_copy(update={"bits": bits}), quantized.adapter)
        return compare_kv_caches(quantized.model, segments, cache, chunk_size=16).kl_mean

    kls = [kl(result, bits) for bits in (2, 3, 4)]
    assert kls == sorted(kls, reverse=True) and kls[0] < 0.02 and kls[-1] < 0.002, kls
    # the massive sink keys in the ranges make every ordinary key collapse
    unprotected = quantsink.quantize(str(planted_folder), calibrated_recipe({"method": "none"}), progress=False)
    assert kl(unprotected, 2) > 50 * kls[0]
    ranges = result.methods[-1].key_ranges
    assert float((ranges[:, 1] - ranges[:, 0]).amax()) < float((unprotected.methods[-1].key_ranges[:, 1]
                                                                 - unprotected.methods[-1].key_ranges[:, 0]).amax()) / 10
    loaded = quantsink.load(result.save(tmp_path / "out"))
    cache = quantsink.kv_cache(loaded)
    assert torch.equal(cache.layers[0].key_range, ranges[0])
    assert compare_kv_caches(loaded, segments, cache, chunk_size=16).kl_mean == pytest.approx(kls[0], rel=1e-6)
