"""The realistic planted Llama: graded sinks (BOS, then the first delimiter, then weaker ones)
whose keys have ordinary norms, noise in the massive channel, ordinary keys with outlier
channels; a KV cache that degrades with fewer bits as on real LLMs, per-channel keys that beat
per-token keys (KIVI), and KVSink-5 that beats PFN-5 at 2 bits (KVSink's Table 2 setting)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from quantsink.evaluate import compare_kv_caches
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.testing.planted_llm import planted_segments
from quantsink.testing.planted_llm_realistic import (
    CONTENT_DIMS, build_realistic_llama, delimiter_rank, realistic_llama_plan,
)

SEGMENTS = 16  # held-out segments of 128 tokens (2,032 predicted tokens)
CACHE = dict(group_size=16, residual_length=0)  # every earlier chunk read back quantized


@pytest.fixture(scope="module")
def realistic():
    model, tokenizer = build_realistic_llama(seed=0)
    return model, tokenizer, realistic_llama_plan(model)


@pytest.fixture(scope="module")
def heldout(realistic):
    return planted_segments(realistic[1], "heldout")[:SEGMENTS]


@pytest.fixture(scope="module")
def hidden(realistic, heldout):
    with torch.no_grad():
        return realistic[0](heldout, output_hidden_states=True).hidden_states  # [i + 1]: output of block i


def massive_ratio(hidden, plan) -> torch.Tensor:
    """|h| in the first massive channel at the emergence layer's output over the median token
    RMS there: what the kvsink profiler ranks tokens by."""
    after = hidden[plan.emergence_layer + 1]
    return after[..., plan.massive_channels[0]].abs() / after.pow(2).mean(-1).sqrt().median()


def kl(model, ids, **scheme) -> tuple[float, float]:
    """(KL, perplexity) of a SinkQuantizedCache against full precision, chunks of 16; `positions`
    (if given) are its kvsink sinks."""
    positions = scheme.pop("positions", None)
    cache = SinkQuantizedCache(KVCacheScheme(**CACHE, **scheme))
    if positions is not None:
        cache.set_sink_positions(positions)
    comparison = compare_kv_caches(model, ids, cache, chunk_size=16)
    return comparison.kl_mean, comparison.perplexity_quantized


def test_sinks_are_graded_and_the_massive_channel_is_noisy(realistic, heldout, hidden):
    _, _, plan = realistic
    rank = delimiter_rank(heldout, plan)
    ratio = massive_ratio(hidden, plan)
    bos, first, second = (float(ratio[rank == r].mean()) for r in (0, 1, 2))
    later, ordinary = ratio[rank >= 3], ratio[rank < 0]
    assert 200 < bos < 400 and 60 < first < 120 and 20 < second < 40, (bos, first, second)
    assert float(later.max()) < 1.0  # the fourth delimiter on is no sink
    assert 0.3 < float(ordinary.mean()) and float(ordinary.max()) < 0.2 * second  # noise, not zero
    assert float(hidden[plan.emergence_layer][..., plan.massive_channels[0]].abs().max()) < 0.05 * first  # not before


def test_later_heads_park_on_bos_and_the_first_delimiter(realistic, heldout):
    model, _, plan = realistic
    ids = heldout[:4]
    rank = delimiter_rank(ids, plan)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    first = rank == 1
    after_first = first.long().cumsum(-1).bool() & (rank < 0)  # ordinary queries that see a first delimiter
    for layer in plan.parking_layers:
        mass = {r: (attentions[layer] * (rank == r)[:, None, None, :]).sum(-1).permute(1, 0, 2)[:, after_first].mean(-1)
                for r in (0, 1, 2, 3)}
        assert bool((mass[0] + mass[1] > 0.75).all()), (layer, mass)
        assert bool((mass[0][:2] > mass[1][:2]).all()) and bool((mass[1][2:] > mass[0][2:]).all()), (layer, mass)
        assert bool((mass[2] < 0.1).all()) and bool((mass[3] < 1e-3).all()), (layer, mass)


def test_sink_keys_have_ordinary_norms_and_other_directions(realistic, heldout, hidden):
    model, _, plan = realistic
    rank = delimiter_rank(heldout, plan)
    layer = plan.parking_layers[0]
    block = model.model.layers[layer]
    with torch.no_grad():
        keys = block.self_attn.k_proj(block.input_layernorm(hidden[layer])).unflatten(-1, (-1, 64))
    norms = keys.norm(dim=-1)
    ordinary = norms[rank < 0].median()
    assert 0.7 < float(norms[rank == 0].mean() / ordinary) < 1.3 and 0.7 < float(norms[rank == 1].mean() / ordinary) < 1.3
    mean_key = torch.nn.functional.normalize(keys[rank < 0].mean(0), dim=-1)
    bos = torch.nn.functional.normalize(keys[rank == 0].mean(0), dim=-1)
    assert float((bos * mean_key).sum(-1).abs().max()) < 0.1  # told apart by direction
    # ordinary keys: a few outlier dimensions several times the content ones
    outliers = keys[rank < 0][..., list(plan.outlier_dims)].abs().mean()
    content = keys[rank < 0][..., list(CONTENT_DIMS)].abs().mean()
    assert float(outliers / content) > 4


def test_it_is_a_language_model(realistic, heldout):
    model, tokenizer, _ = realistic
    exact = compare_kv_caches(model, heldout, DynamicCache(), chunk_size=16).perplexity_reference
    train = planted_segments(tokenizer, "train")
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=len(tokenizer)).double() + 0.5
    unigram = math.exp(-float((counts / counts.sum()).log()[heldout[:, 1:]].mean()))
    assert exact < 0.7 * unigram, (exact, unigram)  # 92.6 against 157


def test_unprotected_caches_degrade_with_fewer_bits_and_per_channel_keys_beat_per_token(realistic, heldout):
    model = realistic[0]
    fp = compare_kv_caches(model, heldout, DynamicCache(), chunk_size=16).perplexity_reference
    measured = {(keys, bits): kl(model, heldout, bits=bits, keys={"granularity": keys})
                for keys in ("per_channel", "per_token") for bits in (2, 3, 4)}
    channel = {bits: measured["per_channel", bits] for bits in (2, 3, 4)}
    assert channel[2][0] > 3 * channel[3][0] > 9 * channel[4][0], measured
    assert channel[2][1] > 1.15 * fp and channel[4][1] < 1.02 * fp, (fp, measured)  # 4 bits near lossless
    for bits in (2, 3, 4):  # KIVI: keys per channel (their outlier channels get their own scales)
        assert measured["per_channel", bits][0] < measured["per_token", bits][0], measured
    assert measured["per_channel", 2][1] < measured["per_token", 2][1], measured


def test_kvsink_5_top_k_beats_pfn_5_at_2_bits(realistic, heldout, hidden):
    """KVSink's setting (KVQuant-style per-channel keys, 2 bits): its top-5 of the prompt by the
    massive channel keeps [BOS], the first delimiter and the next, where PFN-5 keeps [BOS] and
    four ordinary tokens."""
    model, _, plan = realistic
    top = massive_ratio(hidden, plan).topk(5, dim=-1).indices
    rank = delimiter_rank(heldout, plan)
    assert bool((rank.gather(1, top)[:, :2] == torch.tensor([0, 1])).all())  # [BOS], then the first delimiter
    base = dict(bits=2, keys={"granularity": "per_channel"})
    none = kl(model, heldout, **base)
    pfn = kl(model, heldout, **base, sinks={"method": "pfn", "num_sinks": 5})
    kvsink = kl(model, heldout, **base, sinks={"method": "kvsink", "num_sinks": 5}, positions=top)
    assert kvsink[0] < 0.5 * pfn[0] < 0.5 * none[0] and kvsink[1] < pfn[1] < none[1], (none, pfn, kvsink)
