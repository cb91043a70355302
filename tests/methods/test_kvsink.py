"""KVSink on the planted-sink Llama: the profiler finds the planted emergence layer and channels,
the predictor hands the cache the planted sinks (non-initial ones included) before any of the
prefill is quantized, and a kv_cache recipe runs through the CLI, reloads, and evaluates."""
import json
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
        assert len(predicted) == min(5, int(sinks[row].sum()))
        assert bool(sinks[row, predicted].all())  # every predicted position is a planted sink
        assert 0 in predicted.tolist() and bool((predicted > 0).any())  # [BOS] and later delimiters


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


def test_a_model_without_massive_activations_says_to_use_pfn(tmp_path):
    from quantsink.testing.tiny import build_tiny_causal_lm

    adapter = build_tiny_causal_lm("llama")
    adapter.source.spec = "tiny-llama"
    save_model(adapter, tmp_path / "tiny")
    code, error = run_cli("quantize", str(tmp_path / "tiny"), str(RECIPE), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 2 and "no stable outlier channel" in error and "pfn" in error and error.count("\n") == 1


def test_kv_cache_of_a_model_without_a_kv_recipe_is_refused():
    from quantsink.errors import UserError
    from quantsink.testing.tiny import build_tiny_causal_lm

    with pytest.raises(UserError, match="carries no kv_cache recipe"):
        quantsink.kv_cache(build_tiny_causal_lm("llama").model)


@pytest.mark.slow
def test_fp_reference_matches_the_default_cache(result, heldout):
    comparison = compare_kv_caches(result.model, heldout[:2], DynamicCache(), chunk_size=16)
    assert comparison.kl_mean == 0 and math.isclose(comparison.perplexity_reference, comparison.perplexity_quantized)
