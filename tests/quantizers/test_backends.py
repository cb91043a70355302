"""Existing PTQ libraries behind the quantizer registry: torchao and optimum-quanto, through
the CLI on a tiny model: quantize, reload from safetensors, same outputs; fidelity close to
the `fake` backend's."""
import json

import pytest
import torch

import quantsink
from quantsink import cli
from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.evaluate import embed_batches
from quantsink.exports.folder import load_adapter
from quantsink.recipe import QuantizationConfig
from quantsink.registry import QUANTIZERS

CALIBRATION = {"data": "bundled", "num_samples": 4, "batch_size": 4, "seed": 0, "holdout": 4}
PER_TOKEN = {"granularity": "per_token", "dynamic": True}
BACKENDS = {
    "torchao static": {"backend": "torchao"},
    "torchao dynamic": {"backend": "torchao", "activations": PER_TOKEN},
    "torchao weight-only": {"backend": "torchao", "activations": None},
    "quanto static": {"backend": "quanto"},
}


def recipe_file(folder, quantization):
    path = folder / "recipe.yaml"
    path.write_text(quantsink.Recipe.from_dict({"name": "t", "calibration": CALIBRATION, "quantization": quantization}).to_yaml())
    return path


@pytest.fixture(scope="module")
def fake_fidelity(tiny_clip, tmp_path_factory):
    """The fake backend's fidelity for each activation setting the backends are tested with."""
    folder = tmp_path_factory.mktemp("fake")
    reports = {}
    for activations in ({}, PER_TOKEN, None):
        quantization = {"backend": "fake"} if activations == {} else {"backend": "fake", "activations": activations}
        result = quantsink.quantize(str(tiny_clip), recipe_file(folder, quantization), progress=False)
        reports[json.dumps(activations)] = result.report["fidelity"]
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("quantization", BACKENDS.values(), ids=BACKENDS.keys())
def test_backend_quantizes_reloads_and_tracks_fake(quantization, tiny_clip, fake_fidelity, tmp_path):
    recipe = recipe_file(tmp_path, quantization)
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tiny_clip), str(recipe), "-o", str(out), "--quiet"]) == 0
    # no pickle anywhere (report.md and its PNG figures: quantsink.inspection.report)
    assert {path.suffix for path in out.iterdir()} <= {".safetensors", ".json", ".yaml", ".md", ".png"}
    report = json.loads((out / "report.json").read_text())

    in_memory = quantsink.quantize(str(tiny_clip), recipe, progress=False)
    loaded = load_adapter(out)
    samples = load_samples("bundled", loaded.modality, CALIBRATION["num_samples"], CALIBRATION["holdout"], seed=0)
    holdout = [loaded.preprocess(batch) for batch in batched(samples.holdout, 4)]
    assert torch.equal(embed_batches(loaded, holdout), embed_batches(in_memory.adapter, holdout))

    fake = fake_fidelity[json.dumps(quantization.get("activations", {}))]
    assert report["fidelity"]["cosine_mean"] > 0.9
    assert abs(report["fidelity"]["cosine_mean"] - fake["cosine_mean"]) < 0.02
    assert report["fidelity"]["relative_l2"] < 1.5 * fake["relative_l2"] + 0.02
    assert report["fidelity"]["relative_l2"] > 0  # it did quantize


@pytest.mark.parametrize(
    "backend, fields, field",
    [
        ("torchao", {"weights": {"bits": 4}}, "quantization.weights"),
        ("torchao", {"weights": {"observer": "mse"}}, "quantization.weights.observer"),
        ("torchao", {"activations": {"symmetric": False}}, "quantization.activations.symmetric"),
        ("quanto", {"activations": PER_TOKEN}, "quantization.activations"),
        ("quanto", {"weights": {"granularity": "per_tensor"}}, "quantization.weights"),
        ("quanto", {"activations": {"observer": "percentile"}}, "quantization.activations.observer"),
    ],
)
def test_backends_refuse_what_their_library_cannot_run(backend, fields, field):
    config = QuantizationConfig.model_validate({"backend": backend, **fields})
    with pytest.raises(UserError) as error:
        QUANTIZERS.get(backend)(config)
    message = str(error.value)
    assert message.startswith(field + " ") and "\n" not in message and "backend fake" in message


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_regcache_runs_atop_the_backend_and_reloads(backend, tiny_clip, tmp_path):
    """RegCache installs its prefix and deletion before the backend quantizes; both come back."""
    from quantsink.evaluate import fidelity
    from quantsink.models import resolve

    regcache = {"sensitive_layer": 2, "prefix_start": 2, "num_registers": 2, "delete_tokens": 1, "candidate_top_k": 4}
    path = tmp_path / "recipe.yaml"
    path.write_text(quantsink.Recipe.from_dict({"name": "t", "calibration": CALIBRATION, "methods": [{"regcache": regcache}],
                                                "quantization": {"backend": backend}}).to_yaml())
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tiny_clip), str(path), "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "methods.safetensors").is_file()

    loaded = load_adapter(out)
    samples = load_samples("bundled", loaded.modality, CALIBRATION["num_samples"], CALIBRATION["holdout"], seed=0)
    holdout = [loaded.preprocess(batch) for batch in batched(samples.holdout, 4)]
    recomputed = fidelity(embed_batches(resolve(str(tiny_clip)), holdout), embed_batches(loaded, holdout))
    for key in ("cosine_mean", "cosine_min", "relative_l2"):
        assert recomputed[key] == pytest.approx(report["fidelity"][key], abs=1e-6)
