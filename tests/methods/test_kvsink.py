"""KVSink on the planted-sink Llama: the profiler finds the planted emergence layer and channels,
the predictor hands the cache the planted sinks (non-initial ones included) before any of the
prefill is quantized, and a kv_cache recipe runs through the CLI, reloads, and evaluates."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import quantsink
from quantsink import cli
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.attach import build_kv_cache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme, SinkProfiling
from quantsink.methods.kvsink import KVSink, install, profile_sinks
from quantsink.models import resolve, save_model
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import planted_llama_plan, planted_segments, save_planted_llama
from quantsink.testing.tiny import build_tiny

RECIPE = Path(__file__).parents[2] / "recipes" / "planted-llama-kv2-kvsink.yaml"
SEGMENTS = 8  # held-out segments of 128 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_planted_llama(tmp_path_factory.mktemp("planted") / "planted-llama")


@pytest.fixture(scope="module")
def result(folder):
    return quantsink.quantize(str(folder), RECIPE, progress=False)


@pytest.fixture(scope="module")
def heldout(result):
    return planted_segments(result.adapter.processor, "heldout")[:SEGMENTS]


def with_kv(recipe: Recipe, **changes) -> Recipe:
    data = recipe.to_dict()
    sinks = changes.pop("sinks", None)
    data["kv_cache"].update(changes)
    if sinks is not None:
        data["kv_cache"]["sinks"] = sinks
    return Recipe.from_dict(data)


@pytest.mark.slow
def test_profile_finds_the_planted_emergence_layer_and_channels(result):
    plan = planted_llama_plan(result.model)
    profile = result.methods[0].profile
    assert profile.emergence_layer == plan.emergence_layer
    assert set(profile.channels) == set(plan.massive_channels)
    assert profile.peak > 1e3 * profile.scale  # the planted activations dwarf every ordinary token
    assert profile.layer_ratios[plan.emergence_layer - 1] < 100 < profile.layer_ratios[plan.emergence_layer]
    assert result.report["methods"]["kvsink"]["emergence_layer"] == plan.emergence_layer


@pytest.mark.slow
def test_prefill_prediction_finds_the_planted_sinks_beyond_the_first_token(result, heldout):
    plan = planted_llama_plan(result.model)
    cache = quantsink.kv_cache(result)
    assert isinstance(cache, SinkQuantizedCache) and cache.scheme.sinks.method == "kvsink"
    with torch.no_grad():
        result.model(heldout, past_key_values=cache, use_cache=True)
    positions = cache.rows.sink_positions
    sinks = torch.isin(heldout, torch.tensor(plan.sink_token_ids))
    for row in range(heldout.shape[0]):
        predicted = positions[row][positions[row] >= 0]
        assert len(predicted) == 5  # plain top-k (min_score 0) spends the whole budget
        # the planted sinks rank first: all of them when the row has fewer than 5
        assert int(sinks[row, predicted].sum()) == min(5, int(sinks[row].sum()))
        assert 0 in predicted.tolist() and bool((predicted > 0).any())  # [BOS] and later delimiters


@pytest.mark.slow
def test_min_score_offers_only_the_massive_tokens(result, heldout):
    """min_score (a multiple of the token scale at l_E) is the threshold rule: tokens under it
    are never offered, so a row with fewer planted sinks than num_sinks keeps fewer."""
    plan = planted_llama_plan(result.model)
    adapter = result.adapter
    options = SinkProfiling(min_score=100.0)
    profile = result.methods[0].profile.model_copy(update={"threshold": options.min_score * result.methods[0].profile.scale})
    install(adapter, profile, options)
    try:
        cache = SinkQuantizedCache(result.recipe.kv_cache)
        with torch.no_grad():
            result.model(heldout, past_key_values=cache, use_cache=True)
    finally:
        install(adapter, result.methods[0].profile, result.methods[0].options)
    sinks = torch.isin(heldout, torch.tensor(plan.sink_token_ids))
    for row in range(heldout.shape[0]):
        predicted = cache.rows.sink_positions[row][cache.rows.sink_positions[row] >= 0]
        assert len(predicted) == min(5, int(sinks[row].sum())) and bool(sinks[row, predicted].all())


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kvsink_5_beats_pfn_5_and_none(result, heldout, bits):
    perplexities = {}
    for name, sinks in {
        "none": {"method": "none"},
        "pfn-5": {"method": "pfn", "num_sinks": 5},
        "kvsink-5": {"method": "kvsink", "num_sinks": 5},
    }.items():
        recipe = with_kv(result.recipe, bits=bits, sinks=sinks)
        cache = build_kv_cache(recipe.kv_cache, result.adapter)
        comparison = compare_kv_caches(result.model, heldout, cache, chunk_size=16)
        perplexities[name] = comparison.perplexity_quantized
        perplexities["fp"] = comparison.perplexity_reference
    assert perplexities["kvsink-5"] < min(perplexities["pfn-5"], perplexities["none"]), perplexities
    assert perplexities["fp"] < perplexities["kvsink-5"], perplexities


@pytest.mark.slow
def test_left_padded_rows_get_what_they_get_alone(result):
    adapter = result.adapter
    prompts = ["Return the value.\nIf it is not found, the default is", "It is."]
    batch = adapter.preprocess(prompts)
    assert bool((batch["attention_mask"] == 0).any())
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=adapter.processor.pad_token_id)
    together = result.model.generate(**batch, past_key_values=quantsink.kv_cache(result), **options)
    for row, prompt in enumerate(prompts):
        alone = result.model.generate(**adapter.preprocess([prompt]), past_key_values=quantsink.kv_cache(result), **options)
        padding = int((batch["attention_mask"][row] == 0).sum())
        assert torch.equal(together[row, padding:], alone[0]), row


@pytest.mark.slow
def test_cli_quantizes_reloads_and_evaluates(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(folder), str(RECIPE), "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "outlier channel" in captured.out and "perplexity" in captured.out
    assert "Loading weights" not in captured.err  # --quiet silences transformers' bars too
    manifest = json.loads((out / "quantsink.json").read_text())
    assert manifest["quantization"] is None and manifest["methods"][0]["name"] == "kvsink"
    report = json.loads((out / "report.json").read_text())

    model = quantsink.load(out)
    cache = quantsink.kv_cache(model)
    assert cache.scheme.bits == 2 and cache.scheme.sinks.method == "kvsink" and cache.scheme.sinks.num_sinks == 5

    assert cli.main(["eval", str(out), "--quiet"]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["perplexity_quantized"] == pytest.approx(report["kv_cache"]["perplexity_quantized"], rel=1e-6)
    assert evaluation["perplexity_reference"] < evaluation["perplexity_quantized"]
    assert evaluation["kl_mean"] > 0 and evaluation["compression"] > 2


@pytest.mark.slow
def test_eval_on_a_text_file(result, tmp_path):
    out = tmp_path / "out"
    result.save(out)
    text = tmp_path / "text.txt"
    text.write_text(("The value is returned. If it is not found, the default is used.\n\n" * 40))
    evaluation = quantsink.evaluate_kv_cache(out, text=str(text), num_samples=2)
    assert evaluation["text"] == str(text) and evaluation["samples"] == 2
    assert evaluation["tokens"] == 2 * 127


def run_cli(*argv) -> tuple[int, str]:
    import contextlib
    import io as text_io

    stderr = text_io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(list(argv))
    return code, stderr.getvalue()


@pytest.mark.slow
def test_bits_the_backend_lacks_are_refused(folder, tmp_path):
    recipe = tmp_path / "five.yaml"
    recipe.write_text(RECIPE.read_text().replace("bits: 2", "bits: 5"))
    code, error = run_cli("quantize", str(folder), str(recipe), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "kv_cache: bits 5: the quantsink KV cache stores 2, 3, 4, 8, 16 bits" in error
    assert error.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_model_family_without_a_kv_cache_is_refused(tmp_path):
    vision = tmp_path / "clip"
    save_model(build_tiny("hf-clip"), vision)
    code, error = run_cli("quantize", str(vision), str(RECIPE), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "(hf-clip) has none" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_llm_family_without_an_adapter_is_refused(tmp_path):
    folder = tmp_path / "bloom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    code, error = run_cli("quantize", str(folder), str(RECIPE), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "model_type 'bloom'" in error and "llama" in error and error.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("field, value, message", [
    ("emergence_layer", 99, "names decoder block 99, but the model has 6"),
    ("channels", [4096], "names channel 4096, but the model's hidden size is 256"),
])
def test_a_profile_naming_what_the_model_lacks_is_refused(result, tmp_path, field, value, message):
    out = tmp_path / "out"
    result.save(out)
    manifest = json.loads((out / "quantsink.json").read_text())
    manifest["methods"][0]["state"]["profile"][field] = value
    (out / "quantsink.json").write_text(json.dumps(manifest))
    code, error = run_cli("eval", str(out), "--quiet")
    assert code == 2 and message in error and error.count("\n") == 1
    assert not (out / "eval.json").exists()


def test_a_model_without_massive_activations_gets_top_k_sinks_and_a_warning(tmp_path, caplog):
    """A random tiny Llama has no massive activation at all: profiling warns with the numbers
    and still names the strongest channel, so KVSink keeps its top-k, never a silent PFN."""
    from quantsink.testing.tiny import build_tiny_causal_lm

    adapter = build_tiny_causal_lm("llama")
    adapter.source.spec = "tiny-llama"
    save_model(adapter, tmp_path / "tiny")
    with caplog.at_level(logging.WARNING, logger="quantsink.methods.kvsink"):
        result = quantsink.quantize(str(tmp_path / "tiny"), RECIPE, progress=False)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "no stable channel reaches massive_ratio 100" in warning and "pfn" in warning
    profile = result.methods[0].profile
    assert profile.ratios == sorted(profile.ratios, reverse=True) and profile.ratios[0] < 100 and profile.threshold == 0
    assert result.report["methods"]["kvsink"]["ratios"] == profile.ratios
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = quantsink.kv_cache(result)
    with torch.no_grad():
        result.model(ids, past_key_values=cache, use_cache=True)
    assert bool((cache.rows.sink_positions >= 0).all())  # 5 sinks per row, not 1


def test_kv_cache_of_a_model_without_a_kv_recipe_is_refused():
    from quantsink.errors import UserError
    from quantsink.testing.tiny import build_tiny_causal_lm

    with pytest.raises(UserError, match="carries no kv_cache recipe"):
        quantsink.kv_cache(build_tiny_causal_lm("llama").model)


@pytest.mark.slow
def test_fp_reference_matches_the_default_cache(result, heldout):
    comparison = compare_kv_caches(result.model, heldout[:2], DynamicCache(), chunk_size=16)
    assert comparison.kl_mean == 0 and math.isclose(comparison.perplexity_reference, comparison.perplexity_quantized)


# --- the predictor on the realistic fixture (graded sinks, noise in the massive channel) ----
@pytest.fixture(scope="module")
def realistic():
    from quantsink.testing.planted_llm_realistic import build_realistic_llama

    model, tokenizer = build_realistic_llama(seed=0)
    return resolve(model), planted_segments(tokenizer, "heldout")[:4], planted_segments(tokenizer, "train")[:16]


def calibrate(adapter, train, options: SinkProfiling):
    batches = [{"input_ids": train, "attention_mask": torch.ones_like(train)}]
    profile = profile_sinks(adapter, batches, options, progress=False)
    install(adapter, profile, options)
    return profile


def kvsink_cache(bits: int = 2) -> SinkQuantizedCache:
    return SinkQuantizedCache(KVCacheScheme(bits=bits, group_size=16, residual_length=0, sinks={"method": "kvsink", "num_sinks": 5}))


def sink_sets(cache) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in cache.rows.sink_positions]


def top5(scores: torch.Tensor) -> list[set[int]]:
    """Each row's 5 best columns, ties to the earlier one as the cache breaks them (the noise in
    the massive channel belongs to the token, so repeated tokens tie)."""
    return [set(row.tolist()) for row in scores.sort(dim=-1, descending=True, stable=True).indices[:, :5]]


def scores_at(adapter, ids, profile) -> torch.Tensor:
    with torch.no_grad():
        hidden = adapter.model(ids, output_hidden_states=True).hidden_states[profile.emergence_layer + 1]
    return hidden[..., profile.channel].abs()


def test_sinks_under_the_old_threshold_get_top_k_and_a_warning(caplog):
    """Massive activations 10x weaker (68x a token's RMS on [BOS], 22x on the first delimiter):
    the old rule refused (no channel reaches 100x) or kept PFN-1; now the profile warns with
    the numbers and the predictor keeps each row's top 5, [BOS] and the first delimiter first."""
    from quantsink.testing.planted_llm_realistic import RealisticKnobs, build_realistic_llama, delimiter_rank, realistic_llama_plan

    model, tokenizer = build_realistic_llama(seed=0, knobs=RealisticKnobs(massive=6.0))
    plan = realistic_llama_plan(model)
    adapter = resolve(model)
    with caplog.at_level(logging.WARNING, logger="quantsink.methods.kvsink"):
        profile = calibrate(adapter, planted_segments(tokenizer, "train")[:16], SinkProfiling())
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert f"no stable channel reaches massive_ratio 100: the strongest, channel {plan.massive_channels[0]} from block 1" in warning
    assert profile.emergence_layer == plan.emergence_layer and profile.channel == plan.massive_channels[0]
    assert 20 < profile.ratios[0] < 100 and profile.threshold == 0
    ids = planted_segments(tokenizer, "heldout")[:8]
    cache = kvsink_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    rank = delimiter_rank(ids, plan)
    for row, sinks in enumerate(sink_sets(cache)):
        first = int((rank[row] == 1).nonzero()[0])
        assert len(sinks) == 5 and {0, first} <= sinks


def test_hold_takes_the_top_k_of_a_prompt_prefilled_in_chunks(realistic):
    """stream: each row's top 5 of the first chunk; hold: the prompt waits, exact, and a
    decoding step (or end_prefill) decides the top 5 of all of it."""
    adapter, heldout, train = realistic
    prompt, step = heldout[:, :96], heldout[:, 96:97]
    profile = calibrate(adapter, train, SinkProfiling())
    scores = scores_at(adapter, heldout[:, :97], profile)
    decided = {}
    for mode in ("stream", "hold"):
        install(adapter, profile, SinkProfiling(prefill=mode))
        cache, exact = kvsink_cache(), DynamicCache()
        with torch.no_grad():
            for start in range(0, prompt.shape[1], 16):
                adapter.model(prompt[:, start : start + 16], past_key_values=cache, use_cache=True)
                adapter.model(prompt[:, start : start + 16], past_key_values=exact, use_cache=True)
            held = [torch.equal(layer.keys, reference.keys) for layer, reference in zip(cache.layers, exact.layers)]
            assert all(held) == (mode == "hold")  # held tokens are stored exact, in every layer
            adapter.model(step, past_key_values=cache, use_cache=True)
        decided[mode] = sink_sets(cache)
        assert not torch.equal(cache.layers[-1].keys[..., :96, :], exact.layers[-1].keys)  # quantized once decided
    assert decided["stream"] == top5(scores[:, :16])
    assert decided["hold"] == top5(scores)
    assert decided["hold"] != decided["stream"]
    install(adapter, profile, SinkProfiling())


def test_end_prefill_decides_a_held_prompt(realistic):
    adapter, heldout, train = realistic
    profile = calibrate(adapter, train, SinkProfiling(prefill="hold"))
    cache = kvsink_cache()
    with torch.no_grad():
        for start in range(0, 64, 16):
            adapter.model(heldout[:, start : start + 16], past_key_values=cache, use_cache=True)
    assert cache.rows.sink_positions is None and cache.rows.waiting == 64
    cache.end_prefill()
    assert sink_sets(cache) == top5(scores_at(adapter, heldout[:, :64], profile))
    assert cache.rows.decided == 64 and int(cache.layers[0].quantized_values.min()) == 59  # all but the 5 sinks
    install(adapter, profile, SinkProfiling())


def test_norm_scores_over_every_stable_channel(realistic):
    from quantsink.testing.planted_llm_realistic import delimiter_rank, realistic_llama_plan

    adapter, heldout, train = realistic
    profile = calibrate(adapter, train, SinkProfiling(score="norm"))
    plan = realistic_llama_plan(adapter.model)
    assert len(profile.channels) >= 2 and set(plan.massive_channels) <= set(profile.channels)
    cache = kvsink_cache()
    with torch.no_grad():
        adapter.model(heldout, past_key_values=cache, use_cache=True)
    rank = delimiter_rank(heldout, plan)
    for row, sinks in enumerate(sink_sets(cache)):
        assert {0, int((rank[row] == 1).nonzero()[0]), int((rank[row] == 2).nonzero()[0])} <= sinks
    install(adapter, profile, SinkProfiling())


def test_a_folder_saved_before_min_score_keeps_its_threshold(realistic):
    """State written by the threshold-only predictor (no ratios, options without min_score)
    loads and keeps offering only tokens above its threshold (100x: [BOS] only here)."""
    adapter, heldout, train = realistic
    profile = calibrate(adapter, train, SinkProfiling())
    old = profile.model_dump(exclude={"ratios"}) | {"threshold": 100 * profile.scale}
    method = KVSink.restore(adapter, {"options": {"massive_ratio": 100.0, "stable_fraction": 0.5}, "profile": old}, {})
    assert method.profile.ratios == [] and method.options.min_score == 0
    cache = kvsink_cache()
    with torch.no_grad():
        adapter.model(heldout, past_key_values=cache, use_cache=True)
    assert sink_sets(cache) == [{0}] * heldout.shape[0]
    install(adapter, profile, SinkProfiling())
