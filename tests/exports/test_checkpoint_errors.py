"""`quantsink.load` refuses a damaged folder with a one-line CheckpointError, and never
unpickles anything, even a file named model.safetensors that holds a pickle."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantsink
from quantsink.errors import CheckpointError
from quantsink.models import save_model
from quantsink.testing.tiny import build_tiny

RECIPE = {
    "name": "t",
    "calibration": {"data": "bundled", "num_samples": 4, "batch_size": 4, "seed": 0, "holdout": 4},
    "quantization": {"backend": "int8"},
    "export": {"format": "int8"},
}
LAYER = "vision_model.encoder.layers.0.mlp.fc1"


class SideEffect:
    """Unpickling this writes a file: proof that something ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    save_model(build_tiny("hf-clip"), root / "source")
    return quantsink.quantize(str(root / "source"), RECIPE, progress=False).save(root / "good")


@pytest.fixture
def folder(good_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(good_folder, copy)
    return copy


@pytest.fixture(autouse=True)
def unpickling_is_a_failure(monkeypatch):
    """Whatever a test loads, nothing may go through pickle or torch.load."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a loader tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def refused(folder: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        quantsink.load(folder)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_intact_folder_loads(good_folder):
    model = quantsink.load(good_folder)
    assert type(model.get_submodule(LAYER)).__name__ == "Int8Linear"


def test_missing_weights_file(folder):
    (folder / "model.safetensors").unlink()
    assert "model.safetensors is missing" in refused(folder)


def test_missing_tensor(folder):
    rewrite(folder, lambda tensors: tensors.pop(f"{LAYER}.weight_scale"))
    message = refused(folder)
    assert "missing" in message and f"{LAYER}.weight_scale" in message


def test_unexpected_tensor(folder):
    rewrite(folder, lambda tensors: tensors.update({"stowaway": torch.zeros(3)}))
    assert "unexpected ['stowaway']" in refused(folder)


def test_misshaped_tensor(folder):
    rewrite(folder, lambda tensors: tensors.update({f"{LAYER}.weight": torch.zeros(3, 5, dtype=torch.int8)}))
    message = refused(folder)
    assert f"{LAYER}.weight has shape (3, 5)" in message


def test_float_where_integers_belong(folder):
    def to_float(tensors):
        tensors[f"{LAYER}.weight"] = tensors[f"{LAYER}.weight"].float()

    rewrite(folder, to_float)
    assert f"{LAYER}.weight is torch.float32, the model needs torch.int8" in refused(folder)


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "not a readable safetensors file" in refused(folder)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_named_model_safetensors_is_refused_and_never_run(folder, writer, tmp_path):
    marker = tmp_path / "marker"
    payload = {"weight": SideEffect(marker)}
    path = folder / "model.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)  # pickling is allowed; only unpickling is watched
    assert "not a readable safetensors file" in refused(folder)
    assert not marker.exists()


def test_pickled_method_tensors_are_refused(folder, tmp_path):
    # a folder with method state reads methods.safetensors the same way
    marker = tmp_path / "marker"
    manifest = (folder / "quantsink.json").read_text().replace('"methods": []', '"methods": [{"name": "regcache", "state": {}}]')
    (folder / "quantsink.json").write_text(manifest)
    (folder / "methods.safetensors").write_bytes(pickle.dumps(SideEffect(marker)))
    assert "methods.safetensors is not a readable safetensors file" in refused(folder)
    assert not marker.exists()


def set_backend(manifest):
    manifest["quantization"]["backend"] = "nonesuch"


def drop_state(manifest):
    del manifest["quantization"]["state"]


def set_bits(manifest):
    manifest["quantization"]["config"]["weights"]["bits"] = 99


@pytest.mark.parametrize(
    "edit, expected",
    [
        (set_backend, "unknown quantization backend 'nonesuch'"),
        (drop_state, "malformed quantization section"),
        (set_bits, "quantization.config.weights.bits: expected an integer 2-8, got 99"),
    ],
)
def test_a_damaged_manifest(folder, edit, expected):
    path = folder / "quantsink.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    assert expected in refused(folder)


def test_a_truncated_manifest(folder):
    path = folder / "quantsink.json"
    path.write_text(path.read_text()[:200])
    assert "is not valid JSON" in refused(folder)


def test_compressed_tensors_float_weights_are_refused(good_folder, tmp_path):
    # a fake-backend model in compressed-tensors form stores integers that the reader dequantizes
    source = good_folder.parent / "source"
    recipe = {**RECIPE, "quantization": {"backend": "fake"}, "export": {"format": "compressed-tensors"}}
    folder = quantsink.quantize(str(source), recipe, progress=False).save(tmp_path / "ct")
    assert type(quantsink.load(folder).get_submodule(LAYER)).__name__ == "FakeQuantLinear"

    def to_float(tensors):
        tensors[f"{LAYER}.weight"] = tensors[f"{LAYER}.weight"].float()

    rewrite(folder, to_float)
    assert f"{LAYER}.weight must be int8 (256, 64)" in refused(folder)
