"""The planted Llama: massive activations where planted, attention sinks after them, a usable
language model, and the reason for KVSink: quantizing the sinks' KV (or letting them into the
scales) costs perplexity that PFN does not recover and KVSink does."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from quantsink.evaluate import chunked_log_likelihood, compare_kv_caches
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.testing.planted_llm import build_planted_llama, planted_llama_plan, planted_segments

SEGMENTS = 8  # held-out segments of 128 tokens (1,016 predicted tokens) used for perplexity


@pytest.fixture(scope="module")
def planted():
    model, tokenizer = build_planted_llama(seed=0)
    return model, tokenizer, planted_llama_plan(model)


@pytest.fixture(scope="module")
def heldout(planted):
    _, tokenizer, _ = planted
    return planted_segments(tokenizer, "heldout")[:SEGMENTS]


def sink_mask(ids: torch.Tensor, plan) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(plan.sink_token_ids))


def massive_scores(model, ids: torch.Tensor, plan) -> torch.Tensor:
    """|h| in the first planted channel at the output of the emergence layer: what KVSink's
    profiler ranks tokens by."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[plan.emergence_layer + 1]
    return hidden[..., plan.massive_channels[0]].abs()


def perplexity(model, ids: torch.Tensor, cache) -> float:
    return math.exp(-float(chunked_log_likelihood(model, ids, cache, chunk_size=16).mean()))


@pytest.fixture(scope="module")
def full_precision(planted, heldout) -> float:
    return perplexity(planted[0], heldout, DynamicCache())


def test_tokenizer_is_word_level_with_bos_and_delimiters(planted):
    _, tokenizer, plan = planted
    ids = tokenizer("Return the value.\nIt is", return_tensors="pt")["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(ids.tolist()) == ["[BOS]", "return", "the", "value", ".", "\n", "it", "is"]
    assert 1000 < len(tokenizer) < 2000
    assert set(plan.sink_token_ids) == {tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids([".", "\n"])}


def test_massive_activations_emerge_at_layer_1_on_first_token_and_delimiters_only(planted, heldout):
    model, _, plan = planted
    ids = heldout[:8]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # hidden[i + 1]: output of layer i
    sinks = sink_mask(ids, plan)
    assert int(sinks[:, 1:].sum()) > 40  # plenty of non-initial "." and "\n"
    channels = list(plan.massive_channels)
    after = hidden[plan.emergence_layer + 1]
    median = float(after.abs().median())
    peak = after[..., channels].abs().amax(-1)
    assert float(peak[sinks].min()) > 1000 * median
    assert float(peak[:, 0].min()) > 1000 * median and float(peak[:, 1:][sinks[:, 1:]].min()) > 1000 * median
    assert float(peak[~sinks].max()) < 1e-3 * median  # exactly where planted, nowhere else
    others = [c for c in range(after.shape[-1]) if c not in channels]
    assert float(peak[sinks].min()) > 50 * float(after[..., others].abs().max())
    assert float(hidden[plan.emergence_layer].abs().max()) < 0.02 * float(peak[sinks].min())  # not before
    # stable until the last layer cancels them before the readout
    assert float(hidden[plan.cancel_layer][..., channels].abs().amax(-1)[sinks].min()) > 1000 * median
    assert float(hidden[-1][..., channels].abs().max()) < 1.0
    # top-k of the planted channel finds exactly the sinks
    scores = massive_scores(model, ids, plan)
    for row in range(ids.shape[0]):
        found = scores[row].topk(int(sinks[row].sum())).indices
        assert set(found.tolist()) == set(sinks[row].nonzero().squeeze(-1).tolist())


def test_later_heads_park_on_the_sinks_whose_values_are_near_zero(planted, heldout):
    model, _, plan = planted
    ids = heldout[:4]
    sinks = sink_mask(ids, plan)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            output = model(ids, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    for layer, attention in enumerate(output.attentions):
        on_sinks = (attention * sinks[:, None, None, :]).sum(-1)  # (batch, heads, queries)
        per_head = on_sinks.permute(1, 0, 2)[:, ~sinks].mean(-1)  # ordinary queries
        if layer in plan.parking_layers:
            assert bool((per_head > 0.9).all()), (layer, per_head)
        else:
            assert bool((per_head < 0.5).all()), (layer, per_head)
    layer = plan.parking_layers[0]
    block = model.model.layers[layer]
    with torch.no_grad():
        values = block.self_attn.v_proj(block.input_layernorm(output.hidden_states[layer]))
    norms = values.norm(dim=-1)
    assert float(norms[sinks].max()) < 0.01 * float(norms[~sinks].mean())


def test_it_is_a_language_model(planted, heldout, full_precision):
    model, tokenizer, _ = planted
    fp = full_precision
    train = planted_segments(tokenizer, "train")
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=len(tokenizer)).double() + 0.5
    unigram = math.exp(-float((counts / counts.sum()).log()[heldout[:, 1:]].mean()))
    assert fp < 0.8 * unigram < 0.1 * len(tokenizer), (fp, unigram)


def test_compare_kv_caches_sees_what_2_bits_cost(planted, heldout):
    model = planted[0]
    segments = heldout[:2]
    comparison = compare_kv_caches(model, segments, SinkQuantizedCache(KVCacheScheme(bits=2, group_size=16, residual_length=0)))
    assert comparison.tokens == 2 * 127
    assert comparison.perplexity_reference == pytest.approx(perplexity(model, segments, DynamicCache()), rel=1e-5)
    assert comparison.kl_mean > 0.1 and comparison.perplexity_quantized > 1.5 * comparison.perplexity_reference, comparison


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kvsink_recovers_what_pfn_and_no_protection_lose(planted, heldout, full_precision, bits):
    model, _, plan = planted
    sinks = sink_mask(heldout, plan)
    k = int(sinks.sum(-1).max())
    positions = massive_scores(model, heldout, plan).topk(k, dim=-1).indices
    base = dict(bits=bits, group_size=16, residual_length=0)
    kvsink = SinkQuantizedCache(KVCacheScheme(**base, sinks={"method": "kvsink", "num_sinks": k}))
    kvsink.set_sink_positions(positions)
    result = {
        "fp": full_precision,
        "none": perplexity(model, heldout, SinkQuantizedCache(KVCacheScheme(**base))),
        "pfn-5": perplexity(model, heldout, SinkQuantizedCache(KVCacheScheme(**base, sinks={"method": "pfn", "num_sinks": 5}))),
        "kvsink": perplexity(model, heldout, kvsink),
    }
    assert result["kvsink"] < 1.03 * result["fp"], result
    assert result["kvsink"] * 1.1 < min(result["pfn-5"], result["none"]), result


def test_per_token_keys_lose_the_sinks_themselves(planted, heldout, full_precision):
    model, _, plan = planted
    sinks = sink_mask(heldout, plan)
    base = dict(bits=2, group_size=16, residual_length=0, keys={"granularity": "per_token"})
    kvsink = SinkQuantizedCache(KVCacheScheme(**base, sinks={"method": "kvsink", "num_sinks": int(sinks.sum(-1).max())}))
    kvsink.set_sink_positions([row.nonzero().squeeze(-1).tolist() for row in sinks])
    fp = full_precision
    none = perplexity(model, heldout, SinkQuantizedCache(KVCacheScheme(**base)))
    pfn = perplexity(model, heldout, SinkQuantizedCache(KVCacheScheme(**base, sinks={"method": "pfn", "num_sinks": 5})))
    protected = perplexity(model, heldout, kvsink)
    assert protected < 1.06 * fp and protected * 1.2 < pfn and pfn * 5 < none, (fp, none, pfn, protected)
