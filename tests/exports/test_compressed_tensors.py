"""The `compressed-tensors` export, loaded back by transformers' `from_pretrained` and by quantsink."""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import quantsink
from quantsink import cli
from quantsink.errors import CheckpointError, UserError
from quantsink.exports.compressed_tensors import save_compressed_tensors
from quantsink.exports.folder import load_adapter
from quantsink.models import resolve, save_model
from quantsink.quantizers import int8 as int8_module
from quantsink.quantizers.int8 import Int8Linear, Int8Quantizer
from quantsink.testing.tiny import build_tiny

from conftest import kv_scheme_loads
from int8_helpers import calibrated, config, holdout_inputs, write_recipe


def hf_class(folder):
    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def check_compressed_tensors_folder(out, source, group):
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "int-quantized" and config["quantization_status"] == "compressed"
    assert config["kv_cache_scheme"] is None
    (scheme,) = config["config_groups"].values()
    assert scheme["targets"] == ["Linear"]
    assert scheme["weights"].items() >= {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}.items()
    assert scheme["input_activations"].items() >= {"num_bits": 8, "type": "int", "symmetric": True, **group}.items()
    assert config["ignore"] == []  # every Linear is quantized
    linears = [name for name, m in resolve(str(source)).model.named_modules() if isinstance(m, nn.Linear)]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice(f"{linears[0]}.weight").get_dtype() == "I8"
    for name in linears:
        assert {f"{name}.weight", f"{name}.weight_scale"} <= names
        assert (f"{name}.input_scale" in names) == (not group["dynamic"])
        assert f"{name}.weight_zero_point" not in names  # symmetric: no zero points


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.slow
def test_compressed_tensors_of_the_cli_loads_in_transformers(tiny_clip, tmp_path):
    recipe = write_recipe(tmp_path, {"backend": "int8"}, "compressed-tensors")
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tiny_clip), str(recipe), "-o", str(out), "--quiet"]) == 0
    check_compressed_tensors_folder(out, tiny_clip, {"strategy": "tensor", "dynamic": False})

    hf = hf_class(out).from_pretrained(out).eval()
    ours = load_adapter(out)
    assert any(isinstance(m, Int8Linear) for m in ours.model.modules())
    calibration, holdout = holdout_inputs(ours)
    with torch.no_grad():
        # identical inside the calibrated range; beyond it compressed-tensors clips at -128, not -127
        assert relative_error(hf(**calibration)[0], ours.model(**calibration)[0]) < 1e-5
        assert relative_error(hf(**holdout)[0], ours.model(**holdout)[0]) < 1e-2


@pytest.mark.slow
def test_compressed_tensors_of_a_dynamic_text_encoder(tmp_path):
    source = tmp_path / "source"
    save_model(build_tiny("hf-bert-text"), source)
    recipe = write_recipe(tmp_path, {"backend": "fake", "activations": {"granularity": "per_token", "dynamic": True}},
                          "compressed-tensors")
    in_memory = quantsink.quantize(str(source), recipe, progress=False)
    out = in_memory.save(tmp_path / "out")
    check_compressed_tensors_folder(out, source, {"strategy": "token", "dynamic": True})

    # the sentence encoder is built without BERT's pooler, which the config alone would add
    hf = hf_class(out).from_pretrained(out, add_pooling_layer=False).eval()
    _, holdout = holdout_inputs(in_memory.adapter)
    with torch.no_grad():
        # compressed-tensors' dynamic scale is absmax/127.5, quantsink's absmax/127
        assert relative_error(hf(**holdout)[0], in_memory.model(**holdout)[0]) < 1e-2
    assert torch.equal(load_adapter(out).embed(holdout), in_memory.adapter.embed(holdout))


@pytest.mark.slow
def test_compressed_tensors_asymmetric_groups_come_back_exactly(tiny_clip, tmp_path):
    quantization = {"backend": "fake", "weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 16},
                    "activations": {"symmetric": False}}
    recipe = write_recipe(tmp_path, quantization, "compressed-tensors")
    out = tmp_path / "out"
    in_memory = quantsink.quantize(str(tiny_clip), recipe, progress=False)
    in_memory.save(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"  # llm-compressor's format for int weights with int inputs
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("vision_model.encoder.layers.0.mlp.fc1.weight")
        zero_point = f.get_tensor("vision_model.encoder.layers.0.mlp.fc1.weight_zero_point")
    assert weight.dtype == zero_point.dtype == torch.int8
    assert weight.min() >= -8 and weight.max() <= 7  # compressed-tensors' signed 4-bit grid

    hf = hf_class(out).from_pretrained(out).eval()
    calibration, _ = holdout_inputs(in_memory.adapter)
    with torch.no_grad():
        assert torch.allclose(hf(**calibration)[0], in_memory.model(**calibration)[0], atol=1e-6)
    assert torch.equal(load_adapter(out).embed(calibration), in_memory.adapter.embed(calibration))


WEIGHT_ONLY = {
    "8-bit per channel": ("fake", {"bits": 8}),
    "4-bit per group": ("fake", {"bits": 4, "granularity": "per_group", "group_size": 16}),
    "4-bit asymmetric per tensor": ("fake", {"bits": 4, "granularity": "per_tensor", "symmetric": False}),
    "int8 backend": ("int8", {"bits": 8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend, weights", WEIGHT_ONLY.values(), ids=WEIGHT_ONLY.keys())
def test_compressed_tensors_weight_only_is_packed_and_loads_in_transformers(tiny_clip, tmp_path, backend, weights):
    from compressed_tensors.compressors import unpack_from_int32

    recipe = write_recipe(tmp_path, {"backend": backend, "weights": weights, "activations": None}, "compressed-tensors")
    out = tmp_path / "out"
    in_memory = quantsink.quantize(str(tiny_clip), recipe, progress=False)
    in_memory.save(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = config["config_groups"].values()
    # loaders infer each layer's layout from its scheme: weight-only int is pack-quantized
    assert config["format"] == scheme["format"] == "pack-quantized"
    assert scheme["input_activations"] is None

    name = "vision_model.encoder.layers.0.mlp.fc1"
    layer = in_memory.model.get_submodule(name)
    bits, symmetric = weights["bits"], weights.get("symmetric", True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {key.removeprefix(name + "."): f.get_tensor(key) for key in f.keys() if key.startswith(name + ".")}
    assert set(stored) == {"weight_packed", "weight_shape", "weight_scale", "bias"} | ({"weight_zero_point"} if not symmetric else set())
    assert stored["weight_packed"].dtype == torch.int32
    assert stored["weight_packed"].shape == (layer.out_features, layer.in_features * bits // 32)
    assert stored["weight_shape"].tolist() == [layer.out_features, layer.in_features]
    integers = unpack_from_int32(stored["weight_packed"], bits, torch.Size(stored["weight_shape"].tolist()))
    shift = 0 if symmetric else 2 ** (bits - 1)
    expected = layer.weight if backend == "int8" else int8_module.grid_weight(layer) - shift
    assert torch.equal(integers, expected.to(torch.int8))  # quantsink's integers, on the signed grid

    hf = hf_class(out).from_pretrained(out).eval()
    calibration, holdout = holdout_inputs(in_memory.adapter)
    with torch.no_grad():
        for inputs in (calibration, holdout):
            got, want = hf(**inputs)[0], in_memory.model(**inputs)[0]
            if backend == "fake":
                # weight-only: no input rounding to differ, and compressed-tensors dequantizes to
                # the fake backend's float weights, so the same float ops give the same bits (measured: 0)
                assert torch.equal(got, want)
            else:
                # int8 runs x @ q^T then scales, the loaded float model x @ (q * scale)^T: fp32
                # rounding of the reordered product (measured 3.1e-7)
                assert relative_error(got, want) < 1e-6
    assert torch.equal(load_adapter(out).embed(holdout), in_memory.adapter.embed(holdout))


def test_a_packed_weight_of_the_wrong_width_is_refused_on_load(tiny_clip, tmp_path):
    recipe = write_recipe(tmp_path, {"backend": "fake", "weights": {"bits": 4}, "activations": None}, "compressed-tensors")
    out = quantsink.quantize(str(tiny_clip), recipe, progress=False).save(tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight_packed"
    tensors[key] = tensors[key][:, :-1].contiguous()  # as if packed at 3 bits
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_adapter(out)
    message = str(error.value)
    assert f"{key} must be int32 (256, 8)" in message and "re-export" in message and "\n" not in message


@pytest.mark.parametrize("granularity", [{"granularity": "per_channel"}, {"granularity": "per_group", "group_size": 16}])
def test_compressed_tensors_refuses_asymmetric_weight_only_it_cannot_load(tiny_clip, tmp_path, capsys, granularity):
    quantization = {"backend": "fake", "weights": {"bits": 4, "symmetric": False, **granularity}, "activations": None}
    recipe = write_recipe(tmp_path, quantization, "compressed-tensors")
    assert cli.main(["quantize", str(tiny_clip), str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("quantsink: error: quantization.weights.symmetric is false") and "\n" not in message
    assert "packed zero points" in message and "export.format fake-quant" in message
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_needs_a_transformers_model(tmp_path, capsys):
    source = tmp_path / "source"
    save_model(build_tiny("open-clip"), source)
    recipe = write_recipe(tmp_path, {"backend": "int8"}, "compressed-tensors")
    assert cli.main(["quantize", str(source), str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert "needs a transformers model" in message and "\n" not in message


class KVScales:
    """A stand-in for a KV-cache method: static per-tensor int8 scales for every layer."""

    scheme = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}

    def __init__(self, layers: int, scale: float):
        self.tensors = {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor([scale]) for i in range(layers) for kv in "kv"}

    def compressed_tensors_kv_cache(self, adapter):
        return self.scheme, self.tensors


@kv_scheme_loads
def test_a_causal_lm_with_a_kv_scheme_loads_in_transformers(tmp_path):
    """The writer is generic over transformers models: a tiny Llama, W8A8 static, with a KV
    scheme handed in through the method hook."""
    from quantsink.exports.compressed_tensors import CompressedTensorsKVCache

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    tokens = torch.randint(0, 96, (3, 20))
    settings = config(backend="int8", ignore=["re:lm_head"])
    adapter, quantizer = resolve(model), Int8Quantizer(settings)
    calibrated(model, quantizer, tokens)
    with torch.no_grad():
        expected = model(tokens).logits
    kv = KVScales(layers=2, scale=0.05)
    assert isinstance(kv, CompressedTensorsKVCache)
    save_compressed_tensors(adapter, quantizer, tmp_path, kv.compressed_tensors_kv_cache(None))

    config_json = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config_json["kv_cache_scheme"].items() >= KVScales.scheme.items()
    assert config_json["ignore"] == ["lm_head"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.model.layers[1].self_attn.k_scale.item() == pytest.approx(0.05)
    with torch.no_grad():
        with_kv = hf(tokens).logits
        for layer in hf.model.layers:
            layer.self_attn.quantization_enabled = False
        without_kv = hf(tokens).logits
    assert torch.allclose(without_kv, expected, atol=1e-5)  # the W8A8 layers: quantsink's numbers
    drift = ((with_kv - expected).norm() / expected.norm()).item()
    assert 0 < drift < 0.2  # the KV scales are in effect


def test_a_quantized_tied_output_projection_is_refused(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True)).eval()
    adapter, quantizer = resolve(model), Int8Quantizer(config(backend="int8"))
    calibrated(model, quantizer, torch.randint(0, 96, (2, 8)))
    with pytest.raises(UserError, match="quantization.ignore"):
        save_compressed_tensors(adapter, quantizer, tmp_path)
