"""End to end through the CLI for every family: tiny models built from real config classes,
saved to local folders, quantized W8A8, reloaded."""
import json

import pytest
import torch

import quantsink
from quantsink import cli
from quantsink.data import batched, load_samples
from quantsink.evaluate import embed_batches, fidelity
from quantsink.exports.folder import load_adapter
from quantsink.models import resolve, save_model
from quantsink.testing.tiny import TINY_FAMILIES, build_tiny

W8A8 = {
    "name": "tiny-w8a8",
    "calibration": {"data": "bundled", "num_samples": 8, "batch_size": 4, "seed": 0, "holdout": 4},
    "quantization": {
        "weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False},
    },
}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "w8a8.yaml"
    path.write_text(quantsink.Recipe.from_dict(W8A8).to_yaml())
    return path


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cli_quantize_reload_and_report(family, tmp_path, recipe_path, capsys):
    source = tmp_path / "source"
    save_model(build_tiny(family), source)
    out = tmp_path / "out"

    assert cli.main(["quantize", str(source), str(recipe_path), "-o", str(out), "--quiet"]) == 0
    assert "fidelity   cosine mean" in capsys.readouterr().out
    assert {"model.safetensors", "quantsink.json", "recipe.yaml", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())

    in_memory = quantsink.quantize(str(source), recipe_path, progress=False)
    loaded = load_adapter(out)
    assert type(loaded.model) is type(in_memory.model)
    assert type(quantsink.load(out)) is type(resolve(str(source)).model)

    samples = load_samples("bundled", loaded.modality, 8, 4, seed=0)
    holdout = [loaded.preprocess(batch) for batch in batched(samples.holdout, 4)]
    reloaded_embeddings = embed_batches(loaded, holdout)
    assert torch.equal(reloaded_embeddings, embed_batches(in_memory.adapter, holdout))

    reference = embed_batches(resolve(str(source)), holdout)
    recomputed = fidelity(reference, reloaded_embeddings)
    for key in ("cosine_mean", "cosine_min", "relative_l2"):
        assert report["fidelity"][key] == pytest.approx(recomputed[key], abs=1e-6)
    assert report["calibration"]["calibration_samples"] == 8
    assert report["calibration"]["holdout_samples"] == 4
    # W8A8 on a well-behaved tiny model stays close to full precision, and is not a no-op
    assert 0.9 < report["fidelity"]["cosine_mean"] < 1.0
    assert report["quantized_modules"] >= 4 * len(resolve(str(source)).blocks())
    assert len(report["outliers"]) == len(loaded.blocks())


def test_api_accepts_a_module_and_quantizes_it_in_place():
    adapter = build_tiny("hf-clip")
    result = quantsink.quantize(adapter.model, dict(W8A8), progress=False)
    assert result.model is adapter.model
    assert any(type(m).__name__ == "FakeQuantLinear" for m in adapter.model.modules())
