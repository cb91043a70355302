"""One inspection per fixture for the whole session, shared by the files of this folder (each
saved and checked by inspect_checks.check_saved): the planted CLIPs on the shipped recipe's
calibration size, the planted Llamas and the trained sink LM from their saved folders."""
import pytest

from inspect_checks import check_saved
from quantsink.inspection.run import inspect
from quantsink.recipe import Recipe
from quantsink.testing.planted_clip import build_planted_clip, planted_sinks
from quantsink.testing.planted_clip_emergent import build_emergent_clip, emergent_sinks
from quantsink.testing.planted_llm import planted_llama_plan, save_planted_llama
from quantsink.testing.planted_llm_realistic import realistic_llama_plan, save_realistic_llama
from quantsink.testing.sink_lm import sink_lm_path

VISION = {
    "planted": (build_planted_clip, planted_sinks, "recipes/planted-clip-w8a8-regcache.yaml"),
    "emergent": (build_emergent_clip, emergent_sinks, "recipes/planted-clip-emergent-w8a8-regcache.yaml"),
}
VISION_FIGURES = {"residual_tokens.png", "residual_patches.png", "channels.png", "attention.png", "sensitivity.png"}


@pytest.fixture(scope="session", params=sorted(VISION))
def vision_case(request, tmp_path_factory):
    """One inspection per fixture, on the shipped recipe's calibration set size (64 bundled crops)."""
    build, plan_of, recipe_path = VISION[request.param]
    model = build(seed=0)
    default = Recipe.from_yaml(recipe_path)
    inspection = inspect(model, num_samples=default.calibration.num_samples, progress=False)
    folder = tmp_path_factory.mktemp(request.param) / "inspect"
    inspection.save(folder)
    return {"name": request.param, "build": build, "plan": plan_of(model), "inspection": inspection, "folder": folder,
            "default": default, "saved": check_saved(folder, VISION_FIGURES)}


LLMS = {
    # the fixture's folder writer (None: shipped) and plan reader; the shipped recipe each is compared with
    "planted": (save_planted_llama, planted_llama_plan, "recipes/planted-llama-kv2-kvsink.yaml"),
    "realistic": (save_realistic_llama, realistic_llama_plan, "recipes/planted-llama-kv2-kvsink.yaml"),
    "sink-lm": (None, None, "recipes/sink-lm-kv2-kvsink.yaml"),
}
LLM_FIGURES = {"residual_tokens.png", "channels.png", "attention.png", "sensitivity.png", "kvsink.png"}


@pytest.fixture(scope="session", params=sorted(LLMS))
def llm_case(request, tmp_path_factory):
    """One inspection per causal LM on 16 bundled-text segments of 128 tokens, the shipped KV recipes' calibration."""
    save, plan_of, recipe_path = LLMS[request.param]
    if save is None:
        folder = sink_lm_path()
    else:
        folder = tmp_path_factory.mktemp(request.param) / "model"
        save(folder)
    default = Recipe.from_yaml(recipe_path)
    inspection = inspect(str(folder), num_samples=default.calibration.num_samples, progress=False)
    out = tmp_path_factory.mktemp(request.param) / "inspect"
    inspection.save(out)
    plan = None
    if plan_of is not None:
        from quantsink.models import resolve

        plan = plan_of(resolve(str(folder)).model)
    return {"name": request.param, "folder": folder, "plan": plan, "inspection": inspection, "default": default,
            "saved": check_saved(out, LLM_FIGURES)}
