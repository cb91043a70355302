"""transformers' QuantizedCache (the transformers-quanto backend) as the matched baseline: at the
same settings and with no sinks, quantsink's cache computes what it computes, so any gap in the
benchmark comes from what quantsink adds; its flush rule is the one quantsink.kv.backends
documents, and groups it would mix are refused."""
from __future__ import annotations

import pytest
import torch

from quantsink.errors import UserError
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.attach import build_kv_cache
from quantsink.kv.backends import WholeGroupQuantizedCache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.models import resolve
from quantsink.testing.planted_llm import build_planted_llama, planted_segments


@pytest.fixture(scope="module")
def planted():
    model, tokenizer = build_planted_llama(seed=0)
    return resolve(model), planted_segments(tokenizer, "heldout")[:8]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("keys", ["per_token", "per_channel"])
def test_matched_settings_give_transformers_perplexity_within_1_percent(planted, keys, bits):
    adapter, segments = planted
    # chunks of 16 >= residual_length: transformers flushes at every update, so neither keeps an exact window
    matched = dict(bits=bits, keys={"granularity": keys}, group_size=16, residual_length=0)
    ours, theirs = (
        compare_kv_caches(adapter.model, segments, build_kv_cache(KVCacheScheme(backend=backend, **matched), adapter), chunk_size=16)
        for backend in ("quantsink", "transformers-quanto")
    )
    assert theirs.perplexity_quantized == pytest.approx(ours.perplexity_quantized, rel=0.01)
    assert theirs.kl_mean == pytest.approx(ours.kl_mean, rel=0.01)
    assert ours.kl_mean > 0.1  # the fixture's sinks make both lose a lot: the agreement is not that of two no-ops


def test_transformers_keeps_a_sawtooth_window_and_quantizes_the_prompt(planted):
    scheme = KVCacheScheme(backend="transformers-quanto", bits=2, keys={"granularity": "per_channel"}, group_size=16,
                           residual_length=40)
    cache = WholeGroupQuantizedCache(planted[0].model.config, scheme)
    keys = torch.randn(1, 2, 80, 64, generator=torch.Generator().manual_seed(0))
    buffered = []
    for start in range(0, 80, 16):
        cache.update(keys[..., start : start + 16, :], keys[..., start : start + 16, :], 0)
        buffered.append(cache.layers[0].keys.shape[-2] if cache.layers[0].keys.dim() == 4 else 0)
    # the prompt is quantized whole; the buffer fills until buffer + 16 >= 40, then everything is re-quantized
    assert buffered == [0, 16, 32, 0, 16]


@pytest.mark.parametrize("keys", ["per_token", "per_channel"])
def test_its_flushes_requantize_to_the_read_back_of_quantizing_once(planted, keys):
    matched = dict(bits=2, keys={"granularity": keys}, group_size=16, residual_length=0)
    theirs = WholeGroupQuantizedCache(planted[0].model.config, KVCacheScheme(backend="transformers-quanto", **matched))
    ours = SinkQuantizedCache(KVCacheScheme(**matched))
    states = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 5, 64)
    for start in range(0, 64, 16):  # the first chunk is quantized once, then re-quantized at 3 flushes
        chunk = states[..., start : start + 16, :]
        theirs.update(chunk, chunk, 0)
        ours.update(chunk, chunk, 0)
    layer = theirs.layers[0]
    assert torch.equal(layer._dequantize(layer._quantized_keys), ours.layers[0].keys)
    assert torch.equal(layer._dequantize(layer._quantized_values), ours.layers[0].values)
    assert not torch.equal(ours.layers[0].keys, states)


def test_groups_quanto_would_mix_are_refused(planted):
    adapter, segments = planted
    per_channel = KVCacheScheme(backend="transformers-quanto", bits=2, keys={"granularity": "per_channel"}, group_size=16,
                                residual_length=0)
    with pytest.raises(UserError, match="mix heads"):
        compare_kv_caches(adapter.model, segments[:1], build_kv_cache(per_channel, adapter), chunk_size=24)
    wide = KVCacheScheme(backend="transformers-quanto", bits=2, keys={"granularity": "per_token"}, group_size=128)
    with pytest.raises(UserError, match="divides 64"):
        compare_kv_caches(adapter.model, segments[:1], build_kv_cache(wide, adapter), chunk_size=16)
    for refused, field in (({"keys": {"pre_rope": True}}, "keys.pre_rope"), ({"outlier_fraction": 0.01}, "outlier_fraction"),
                           ({"sinks": {"method": "pfn"}}, "sinks.method pfn")):
        with pytest.raises(ValueError, match=f"backend transformers-quanto has no {field}: use backend quantsink"):
            KVCacheScheme(backend="transformers-quanto", bits=2, **refused)
