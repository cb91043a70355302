"""Sequential calibration (quantsink.sequential): block by block over the whole set gives the
same statistics, quantization parameters and method state as in-memory passes, bit for bit, with
the streams in memory or on disk; installs that keep state between blocks get it per batch; an
interrupted pass leaves neither OUT nor stray files in the offload folder."""
import pytest
import torch

from quantsink.cli import main
from quantsink.errors import UserError
from quantsink.methods.kvsink import profile_sinks
from quantsink.models import resolve, save_model
from quantsink.pipeline import calibrate, run
from quantsink.recipe import ExecutionConfig, QuantizationConfig, Recipe
from quantsink.registry import QUANTIZERS
from quantsink.data import load_samples
from quantsink.kv.scheme import SinkProfiling
from quantsink.testing.planted_clip import build_planted_clip
from quantsink.testing.planted_llm import build_planted_llama, planted_segments, save_planted_llama
from quantsink.testing.tiny import build_tiny, build_tiny_causal_lm

W8A8 = {"backend": "fake", "targets": ["Linear"],
        "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "minmax"}}


def executions(tmp_path):
    return [ExecutionConfig(pipeline="sequential"), ExecutionConfig(pipeline="sequential", offload_dir=str(tmp_path / "offload"))]


def batches_of(adapter, count=12, batch_size=4):
    samples = load_samples("bundled", adapter.modality, count, 4, 0, 24 if adapter.modality == "text" else None)
    return [adapter.preprocess(samples.calibration[i:i + batch_size], max_length=24) for i in range(0, count, batch_size)]


def calibrated(build, execution, observer="minmax"):
    adapter = build()
    config = QuantizationConfig.model_validate({**W8A8, "activations": {**W8A8["activations"], "observer": observer}})
    quantizer = QUANTIZERS.get("fake")(config)
    calibration = calibrate(adapter, quantizer, batches_of(adapter), progress=False, execution=execution)
    quantizer.freeze(adapter.model)
    return calibration.stats, adapter.model.state_dict()


def assert_same(reference, other):
    (stats, state), (other_stats, other_state) = reference, other
    assert all(torch.equal(a, b) for a, b in zip(stats.channel_absmax, other_stats.channel_absmax, strict=True))
    for block, other_block in zip(stats.token_linf, other_stats.token_linf, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(block, other_block, strict=True))
    assert state.keys() == other_state.keys()
    differing = [name for name in state if not torch.equal(state[name], other_state[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


BUILDERS = {
    "hf-clip": lambda: build_tiny("hf-clip"),
    "hf-siglip2": lambda: build_tiny("hf-siglip2"),  # a Linear patch embedding: a watched module in the stem
    "open-clip": lambda: build_tiny("open-clip"),
    "timm-vit": lambda: build_tiny("timm-vit"),
    "hf-bert-text": lambda: build_tiny("hf-bert-text"),  # padded text: per-token masks per batch
    "llama": lambda: build_tiny_causal_lm("llama"),  # rotary embeddings and masks in every block's call
    "qwen2": lambda: build_tiny_causal_lm("qwen2"),
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_sequential_calibration_is_bit_identical_to_in_memory(family, tmp_path):
    reference = calibrated(BUILDERS[family], ExecutionConfig())
    for execution in executions(tmp_path):
        assert_same(reference, calibrated(BUILDERS[family], execution))
    assert not any((tmp_path / "offload").iterdir()), "the offload folder keeps files after the pass"


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_observers_that_keep_per_batch_state_agree_too(observer, tmp_path):
    reference = calibrated(BUILDERS["hf-clip"], ExecutionConfig(), observer)
    assert_same(reference, calibrated(BUILDERS["hf-clip"], executions(tmp_path)[1], observer))


def pipeline_result(spec, recipe):
    artifact, stats = run(spec, Recipe.from_dict(recipe), progress=False)
    states = {method.name: method.state() for method in artifact.methods}
    return artifact, stats, states


REGCACHE = {
    "searched": {"candidate_top_k": 8},  # every field auto: the reference pass feeds the search
    "none": {"sensitive_layer": 2, "prefix_start": 1, "num_registers": 2, "delete_tokens": 2, "refill": "none"},
    "neighbours": {"sensitive_layer": 2, "prefix_start": 1, "num_registers": 2, "delete_tokens": 2, "refill": "neighbours"},
}


@pytest.mark.parametrize("options", sorted(REGCACHE))
def test_regcache_recipe_gives_the_same_folder_contents(options, tmp_path):
    """The registers, the settings (searched or given) and the quantized weights; the calibration
    pass runs with the register prefix and a token deletion installed, whose kept tokens (and
    refill weights) are swapped per batch."""
    recipe = {"name": "seq", "calibration": {"num_samples": 16, "batch_size": 4, "holdout": 4},
              "methods": [{"regcache": REGCACHE[options]}], "quantization": W8A8}
    reference = pipeline_result(build_planted_clip(), recipe)
    # regcache's trials quantize the model in place, so its weights stay resident (no offload_dir)
    sequential = pipeline_result(build_planted_clip(), {**recipe, "execution": {"pipeline": "sequential"}})
    assert_same((reference[1], reference[0].adapter.model.state_dict()),
                (sequential[1], sequential[0].adapter.model.state_dict()))
    (settings, tensors), (other_settings, other_tensors) = reference[2]["regcache"], sequential[2]["regcache"]
    assert settings["settings"] == other_settings["settings"]
    assert settings["report"]["trials"] == other_settings["report"]["trials"]
    assert all(torch.equal(tensors[name], other_tensors[name]) for name in tensors)
    assert reference[0].report["fidelity"] == sequential[0].report["fidelity"]


def test_sink_tokens_predictor_rows_are_kept_per_batch(tmp_path):
    """sink-tokens predicts outlier rows at one block and uses them in later blocks' Linears."""
    recipe = {"name": "seq", "calibration": {"num_samples": 16, "batch_size": 8, "holdout": 4, "seq_len": 32},
              "methods": [{"sink-tokens": {"outlier_ratio": 5.0}}], "quantization": W8A8}
    reference = pipeline_result("all-minilm-l6-v2", recipe)  # real weights: [CLS] is its outlier token
    sequential = pipeline_result("all-minilm-l6-v2", {**recipe, "execution": {"pipeline": "sequential"}})
    assert reference[2]["sink-tokens"][0] == sequential[2]["sink-tokens"][0]
    assert_same((reference[1], reference[0].adapter.model.state_dict()),
                (sequential[1], sequential[0].adapter.model.state_dict()))


def test_kvsink_profile_is_the_same(tmp_path):
    model, tokenizer = build_planted_llama()
    adapter = resolve(model)
    segments = planted_segments(tokenizer, "train")[:12]
    batches = [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in segments.split(4)]
    reference = profile_sinks(adapter, batches, SinkProfiling(), progress=False)
    for execution in executions(tmp_path):
        assert profile_sinks(adapter, batches, SinkProfiling(), progress=False, execution=execution) == reference


def test_an_install_that_has_not_declared_its_state_is_refused():
    adapter = build_tiny_causal_lm("llama")
    from quantsink.models.handles import installing

    with installing(adapter.model, "home-made"):
        with pytest.raises(UserError, match="home-made install .* has not said what it keeps between blocks"):
            calibrate(adapter, QUANTIZERS.get("fake")(QuantizationConfig.model_validate(W8A8)), batches_of(adapter),
                      progress=False, execution=ExecutionConfig(pipeline="sequential"))


def test_an_interrupted_calibration_leaves_no_out_and_no_offload_files(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the sequential pass, through the CLI: no OUT, an empty offload folder."""
    save_model(build_tiny("hf-clip"), tmp_path / "model")
    offload = tmp_path / "offload"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Recipe.from_dict({
        "name": "seq", "calibration": {"num_samples": 12, "batch_size": 4, "holdout": 4},
        "execution": {"pipeline": "sequential", "offload_dir": str(offload)}, "quantization": W8A8}).to_yaml())
    import quantsink.sequential as sequential

    calls = {"blocks": 0}
    original = sequential._Streams.put

    def put_then_interrupt(self, batch, hidden):
        original(self, batch, hidden)
        calls["blocks"] += 1
        if calls["blocks"] == 7:  # the capture wrote 3 streams; block 0 has written 3 more, block 1 one
            assert len(list(self.folder.iterdir())) == 3
            raise KeyboardInterrupt

    monkeypatch.setattr(sequential._Streams, "put", put_then_interrupt)
    assert main(["quantize", str(tmp_path / "model"), str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 130
    assert calls["blocks"] == 7
    assert not (tmp_path / "out").exists()
    assert offload.is_dir() and not any(offload.iterdir())


def test_an_unwritable_offload_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    adapter = build_tiny("hf-clip")
    with pytest.raises(UserError, match="--offload-dir .*cannot write there"):
        calibrate(adapter, QUANTIZERS.get("fake")(QuantizationConfig.model_validate(W8A8)), batches_of(adapter),
                  progress=False, execution=ExecutionConfig(pipeline="sequential", offload_dir=str(blocker / "sub")))


STATIC_KV = {"bits": 8, "type": "float", "scales": "static", "keys": {"granularity": "per_tensor"},
             "values": {"granularity": "per_tensor"}}


def test_static_kv_scales_with_pfn_sinks_give_the_same_model(tmp_path):
    """The calibration pass runs with the static KV fake-quantization installed, its sinks decided
    per call before block 0 (a state kept per batch)."""
    folder = save_planted_llama(tmp_path / "llama")
    recipe = {"name": "seq", "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 2, "seq_len": 64},
              "quantization": W8A8, "kv_cache": {**STATIC_KV, "sinks": {"method": "pfn", "num_sinks": 2}}}
    reference = pipeline_result(str(folder), recipe)
    sequential = pipeline_result(str(folder), {**recipe, "execution": {"pipeline": "sequential"}})
    assert_same((reference[1], reference[0].adapter.model.state_dict()),
                (sequential[1], sequential[0].adapter.model.state_dict()))
    assert reference[0].report["fidelity"] == sequential[0].report["fidelity"]


def test_static_kv_scales_with_predicted_sinks_are_refused_with_the_reason(tmp_path):
    folder = save_planted_llama(tmp_path / "llama")
    recipe = {"name": "seq", "calibration": {"num_samples": 8, "batch_size": 4, "holdout": 2, "seq_len": 64},
              "quantization": W8A8, "kv_cache": {**STATIC_KV, "sinks": {"method": "kvsink", "num_sinks": 2}},
              "execution": {"pipeline": "sequential"}}
    with pytest.raises(UserError, match="kvsink with static scales predicts each call's sinks with a forward to block l_E"):
        run(str(folder), Recipe.from_dict(recipe), progress=False)
