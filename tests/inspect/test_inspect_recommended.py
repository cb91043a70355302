"""The recommended recipe of each planted fixture quantizes at least as well as the shipped
recipe for it, both run with the shipped recipe's calibration and holdout split (so on the same
samples): the CLIPs' holdout fidelity, the Llamas' KV-cache KL to full precision. Slow: each
runs RegCache's search or the KV evaluation twice."""
import pytest

from quantsink import api
from quantsink.recipe import Recipe


def matched(recommended: Recipe, default: Recipe) -> Recipe:
    return Recipe.from_dict({**recommended.to_dict(), "calibration": default.calibration.model_dump()})


@pytest.mark.slow
def test_vision_recommendation_is_at_least_as_good_as_the_shipped_recipe(vision_case):
    default = vision_case["default"]
    recommended = matched(vision_case["inspection"].recommend(), default)
    fidelity = {name: api.quantize(vision_case["build"](seed=0), recipe, progress=False).report["fidelity"]
                for name, recipe in (("recommended", recommended), ("default", default))}
    assert fidelity["recommended"]["centered_cosine_mean"] >= fidelity["default"]["centered_cosine_mean"] - 1e-9
    assert fidelity["recommended"]["cosine_mean"] >= fidelity["default"]["cosine_mean"] - 1e-9


@pytest.mark.slow
# the trained sink LM is not a planted fixture: benchmarks/RESULTS.md (issue 14) has its numbers
@pytest.mark.parametrize("llm_case", ["planted", "realistic"], indirect=True)
def test_llm_recommendation_is_at_least_as_good_as_the_shipped_recipe(llm_case):
    default = llm_case["default"]
    recommended = matched(llm_case["inspection"].recommend(), default)
    kv = {name: api.quantize(str(llm_case["folder"]), recipe, progress=False).report["kv_cache"]
          for name, recipe in (("recommended", recommended), ("default", default))}
    assert kv["recommended"]["kl_mean"] <= kv["default"]["kl_mean"]
