"""The `int8` export: integers on disk, loaded back as int8 layers."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import quantsink
from quantsink import cli
from quantsink.exports.folder import load_adapter
from quantsink.models import resolve
from quantsink.quantizers.int8 import Int8Linear

from int8_helpers import holdout_inputs, write_recipe


@pytest.mark.slow
def test_int8_export_is_a_quarter_of_fp32_and_loads_in_int8(tiny_clip, tmp_path):
    recipe = write_recipe(tmp_path, {"backend": "fake"}, "int8")
    in_memory = quantsink.quantize(str(tiny_clip), recipe, progress=False)  # fake backend
    in_memory.save(tmp_path / "out")
    loaded = load_adapter(tmp_path / "out")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == in_memory.report["quantized_modules"]
    manifest = json.loads((tmp_path / "out" / "quantsink.json").read_text())
    assert manifest["quantization"]["backend"] == "int8"

    # every Linear weight is stored as int8; the rest (embeddings, norms, biases, scales) in float
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    fp32 = resolve(str(tiny_clip)).model
    linear_weights = {f"{name}.weight" for name, m in fp32.named_modules() if isinstance(m, nn.Linear)}
    assert all(stored[key].dtype == torch.int8 for key in linear_weights)
    expected_bytes = sum(t.numel() * (1 if k in linear_weights else t.element_size()) for k, t in fp32.state_dict().items())
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    scale_bytes = sum(t.numel() * 4 for k, t in stored.items() if k.endswith("_scale"))
    assert stored_bytes == expected_bytes + scale_bytes

    calibration, holdout = holdout_inputs(loaded)
    for inputs in (calibration, holdout):
        expected, got = in_memory.adapter.embed(inputs), loaded.embed(inputs)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_int8_export_refuses_what_int8_cannot_hold(tiny_clip, tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"backend": "fake", "weights": {"bits": 4}}, "int8")
    assert cli.main(["quantize", str(tiny_clip), str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("quantsink: error: quantization.weights.bits is 4") and "\n" not in message
    assert "export.format fake-quant" in message
    assert not (tmp_path / "out").exists()

