"""The trained sink LM shipped in the package (quantsink.testing.sink_lm): it loads offline as a
Llama, its [BOS] sink, massive channel and value-state drain are there (and, on real text, the
sink is not), KVSink's profile finds that channel and predicts tokens the later layers attend
to, and KVSink-5 costs less KL than no protection and no more than PFN-5. Nothing here trains."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import quantsink
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.attach import build_kv_cache
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.sink_lm import (
    attention_mass,
    heldout_segments,
    load_sink_lm,
    sink_lm_path,
    sink_statistics,
)
from quantsink.testing.train_sink_lm import BigramBackcopy, token_stream

RECIPE = Path(__file__).parents[2] / "recipes" / "sink-lm-kv2-kvsink.yaml"
SEGMENTS = 16  # held-out sequences of 128 tokens per kind
MIDDLE = 2  # "from the middle layers on": blocks 2 and 3 of 4
STRATEGIES = {
    "none": {"method": "none"},
    "pfn-5": {"method": "pfn", "num_sinks": 5},
    "kvsink-5": {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 0}},
}


@pytest.fixture(scope="module")
def result():
    return quantsink.quantize(str(sink_lm_path()), RECIPE, progress=False)


@pytest.fixture(scope="module")
def segments(result):
    tokenizer = result.adapter.processor
    return {kind: heldout_segments(tokenizer, kind, SEGMENTS) for kind in ("backcopy", "text")}


@pytest.fixture(scope="module")
def statistics(result, segments):
    return {kind: sink_statistics(result.model, result.adapter.processor, ids) for kind, ids in segments.items()}


def test_the_shipped_weights_load_from_the_package_as_a_llama():
    folder = sink_lm_path()
    assert folder.parent == Path(quantsink.__file__).parent / "testing"
    assert (folder / "model.safetensors").stat().st_size <= 5 * 2**20
    adapter = resolve(str(folder))
    assert adapter.family == "hf-llama" and isinstance(adapter.model, LlamaForCausalLM)
    model, tokenizer = load_sink_lm()
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    assert tokenizer("It is.")["input_ids"][0] == tokenizer.bos_token_id


def test_it_learned_the_backcopy_rule(result, segments):
    """After a trigger, the next token is the one before the trigger: the model predicts it."""
    tokenizer = result.adapter.processor
    ids = segments["backcopy"]
    triggers = BigramBackcopy(token_stream(tokenizer), tokenizer).triggers
    with torch.no_grad():
        predicted = result.model(ids).logits.argmax(-1)
    copied = torch.isin(ids[:, :-1], triggers)
    copied[:, :2] = False
    targets = ids[:, 1:][copied]
    assert int(copied.sum()) > 50
    assert float((predicted[:, :-1][copied] == targets).float().mean()) > 0.95


def test_bos_is_the_sink_with_a_massive_channel_and_drained_values(statistics):
    stats = statistics["backcopy"]
    # dormant heads park on [BOS] from block 2 on (Guo et al.'s active-dormant heads)
    assert bool((stats.bos_attention[MIDDLE:] > 0.7).all()), stats.bos_attention
    assert float(stats.first_delimiter_attention[MIDDLE:].max()) < 0.05
    # one channel holds [BOS]'s massive activation from block 0 to 2, tens of times a token's RMS
    assert stats.massive_channel[:3] == [stats.massive_channel[0]] * 3
    assert stats.massive_token[:3] == ["bos"] * 3
    assert min(stats.massive_ratio[:3]) > 20 and min(stats.bos_norm_ratio[:3]) > 4
    # value-state drain: [BOS]'s values are a fraction of an ordinary token's in every layer
    assert max(stats.bos_value_ratio) < 0.5


def test_on_real_text_the_channel_stays_but_the_heads_do_not_park(statistics):
    """Where the method should not help by attention alone: on held-out prose the heads are
    active, so [BOS] draws little attention, yet it keeps the same massive channel."""
    text, backcopy = statistics["text"], statistics["backcopy"]
    assert float(text.bos_attention.max()) < 0.2
    assert text.massive_channel[:3] == backcopy.massive_channel[:3] and text.massive_token[:3] == ["bos"] * 3


def test_kvsink_profile_finds_the_channel_and_predicts_tokens_later_layers_attend_to(result, segments, statistics):
    profile = result.methods[0].profile
    assert profile.channel == statistics["backcopy"].massive_channel[0]
    assert profile.emergence_layer == 0 and profile.threshold == 0  # min_score 0: the paper's top-k
    assert 20 < profile.ratios[0] < 100  # weaker than Llama-2's massive activations: profiled with a warning
    ids = segments["backcopy"]
    cache = quantsink.kv_cache(result)
    with torch.no_grad():
        result.model(ids, past_key_values=cache, use_cache=True)
    positions = cache.rows.sink_positions
    assert bool((positions >= 0).sum(-1).eq(5).all())  # top-k: weak sinks still fill the budget
    assert bool((positions == 0).any(-1).all())  # [BOS] is predicted in every row
    predicted = torch.zeros_like(ids, dtype=torch.bool)
    predicted.scatter_(1, positions.clamp_min(0), positions >= 0)
    queries = torch.zeros_like(predicted)
    queries[:, 8:] = True
    mass = attention_mass(result.model, ids, predicted, queries)[MIDDLE:]
    assert float((mass > 0.5).float().mean()) > 0.5, mass  # most heads put most of their attention there


def with_kv(recipe: Recipe, **changes) -> Recipe:
    data = recipe.to_dict()
    data["kv_cache"].update(changes)
    return Recipe.from_dict(data)


def kl_by_strategy(result, ids: torch.Tensor, bits: int) -> dict[str, float]:
    kl = {}
    for name, sinks in STRATEGIES.items():
        cache = build_kv_cache(with_kv(result.recipe, bits=bits, sinks=sinks).kv_cache, result.adapter)
        kl[name] = compare_kv_caches(result.model, ids, cache, chunk_size=16).kl_mean
    return kl


@pytest.mark.parametrize("kind", ["backcopy", "text"])
def test_kvsink_5_beats_none_and_is_no_worse_than_pfn_5_at_2_bits(result, segments, kind):
    kl = kl_by_strategy(result, segments[kind], bits=2)
    assert kl["kvsink-5"] < 0.5 * kl["none"], kl
    assert kl["kvsink-5"] <= kl["pfn-5"], kl


@pytest.mark.parametrize("bits", [3, 4])
def test_kvsink_5_beats_none_at_3_and_4_bits(result, segments, bits):
    kl = kl_by_strategy(result, segments["backcopy"], bits)
    assert kl["kvsink-5"] < kl["none"], kl
