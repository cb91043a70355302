from pathlib import Path

import pytest

import quantsink
from quantsink.errors import UserError
from quantsink.recipe import Recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = Recipe.from_yaml(path)
    # fixture recipes take their model (a local folder) from the command line
    assert recipe.model is not None or path.name.startswith("planted-")
    assert recipe.name == path.stem


def test_defaults_are_w8a8_per_tensor_static():
    recipe = Recipe.from_dict({})
    assert recipe.quantization.weights.bits == 8
    assert recipe.quantization.activations.granularity == "per_tensor"
    assert recipe.quantization.activations.dynamic is False
    assert recipe.export.format == "fake-quant"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"quantization": {"activations": {"bits": "nine"}}}, "quantization.activations.bits: expected an integer 2-8, got 'nine'"),
        ({"quantization": {"weights": {"bits": 1}}}, "quantization.weights.bits: expected an integer 2-8, got 1"),
        ({"quantization": {"weights": {"granularity": "per_group"}}}, "per_group granularity needs group_size"),
        ({"quantization": {"activations": {"granularity": "per_token"}}}, "per_token activations need dynamic: true"),
        ({"quantization": {"backend": "fak"}}, "unknown quantization backend 'fak': did you mean fake?"),
        ({"quantization": {"weights": {"observer": "minmx"}}}, "did you mean minmax?"),
        ({"quantization": {"weight": {}}}, "quantization.weight: unknown field"),
        ({"calibration": {"num_samples": 0}}, "calibration.num_samples: expected a positive integer, got 0"),
        ({"methods": [{"regcash": {}}]}, "unknown method 'regcash'"),
        ({"export": {"format": "onnx"}}, "unknown export format 'onnx'"),
        ({"quantization": {"targets": []}}, "quantization.targets: expected at least one target"),
        ({"quantization": None}, "the recipe quantizes nothing; give a quantization or a kv_cache section"),
        ({"kv_cache": {"bits": 5}}, "kv_cache: bits 5: the quantsink KV cache stores 2, 3, 4, 8, 16 bits"),
        ({"kv_cache": {"backend": "transformers-quanto", "bits": 4, "keys": {"pre_rope": True}}},
         "backend transformers-quanto has no keys.pre_rope: use backend quantsink"),
        ({"kv_cache": {"backend": "transformers-quanto", "bits": 3, "keys": {"granularity": "per_token"}}},
         "the transformers-quanto KV cache stores 2, 4 bits"),
        ({"kv_cache": {"backend": "hqq"}}, "unknown KV cache backend 'hqq'"),
        ({"kv_cache": {"sinks": {"method": "first"}}}, "kv_cache.sinks.method: Input should be 'none', 'pfn' or 'kvsink'"),
        ({"kv_cache": {"sinks": {"method": "pfn", "profile": {}}}}, "profile tunes the kvsink predictor"),
        ({"kv_cache": {"sinks": {"method": "kvsink", "profile": {"massive_ratio": 0.5}}}}, "massive_ratio"),
        ({"kv_cache": {"values": {"granularity": "per_channel"}}}, "kv_cache.values.granularity"),
    ],
)
def test_errors_name_the_field_and_the_fix(data, message):
    with pytest.raises(UserError) as error:
        Recipe.from_dict(data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nquantization: {weights: [\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d"):
        Recipe.from_yaml(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_round_trips_through_yaml(tmp_path):
    recipe = Recipe.from_dict({"name": "r", "quantization": {"weights": {"granularity": "per_group", "group_size": 32}}})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe


def test_a_kv_cache_recipe_leaves_weights_alone_unless_it_says():
    recipe = Recipe.from_dict({"kv_cache": {"bits": 2, "sinks": {"method": "kvsink", "num_sinks": 5}}})
    assert recipe.quantization is None and recipe.kv_cache.bits == 2 and recipe.kv_cache.sinks.num_sinks == 5
    both = Recipe.from_dict({"kv_cache": {"bits": 4}, "quantization": {}})
    assert both.quantization.weights.bits == 8 and both.kv_cache.keys.granularity == "per_channel"
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # None survives the round trip through the folder
