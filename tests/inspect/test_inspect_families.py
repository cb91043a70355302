"""Every family quantsink supports inspects: a tiny model of each (random weights, so no sink to
name), each figure drawn, the recipe valid."""
import pytest

from inspect_checks import check_saved
from quantsink.inspection.run import inspect
from quantsink.testing.tiny import TINY_FAMILIES, build_tiny, build_tiny_causal_lm

ENCODER_FIGURES = {"residual_tokens.png", "channels.png", "attention.png", "sensitivity.png"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_encoder_family_inspects(family, tmp_path):
    inspection = inspect(build_tiny(family), num_samples=8, batch_size=4, progress=False)
    image = inspection.data["modality"] == "image"
    inspection.save(tmp_path / "out")
    data = check_saved(tmp_path / "out", ENCODER_FIGURES | ({"residual_patches.png"} if image else set()))
    assert len(data["blocks"]) == len(data["shown"][0]["token_linf"]) == 4
    if image:
        assert data["shown"][0]["grid"] is not None
        grid = data["shown"][0]["grid"]
        assert len(data["shown"][0]["token_linf"][0]) >= grid[0] * grid[1] + data["num_prefix_tokens"]
    assert data["kind"] == ("vision" if image else "text-encoder")
    assert inspection.recommend().quantization is not None


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt_neox"])  # one per causal-LM adapter family
def test_every_causal_lm_family_inspects(model_type, tmp_path):
    inspection = inspect(build_tiny_causal_lm(model_type), num_samples=4, batch_size=4, progress=False)
    inspection.save(tmp_path / "out")
    data = check_saved(tmp_path / "out", ENCODER_FIGURES | {"kvsink.png"})
    assert data["kind"] == "causal-lm"
    assert inspection.recommend().kv_cache.sinks.method == "kvsink"
