"""RegCache's measured choices: the criterion, the search space (null and each part alone),
the validation split, the per-Linear sensitivity scan, the prefix start range, the DINOv2
prefix placement, and "never worse than naive" on the planted fixtures at three bit widths."""
from pathlib import Path

import pytest

import quantsink
from quantsink.pipeline import quantize_as_recipe
from quantsink.errors import UserError
from quantsink.data import batched, load_samples
from quantsink.evaluate import embed_batches, fidelity
from quantsink.methods.regcache import install
from quantsink.methods.regcache.options import RegCacheOptions, RegCacheSettings
from quantsink.methods.regcache.search import start_range
from quantsink.models.attention import edits_of
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.planted_clip import build_planted_clip, planted_sinks
from quantsink.testing.planted_clip_emergent import build_emergent_clip
from quantsink.testing.tiny import build_tiny

RECIPES = Path(__file__).parents[2] / "recipes"
BIT_WIDTHS = [(8, 8), (6, 6), (4, 8)]


def recipe_at(name: str, weights: int, activations: int, regcache: bool = True) -> Recipe:
    data = Recipe.from_yaml(RECIPES / name).to_dict()
    data["quantization"]["weights"]["bits"] = weights
    data["quantization"]["activations"]["bits"] = activations
    if not regcache:
        data["methods"] = []
    return Recipe.from_dict(data)


def test_the_prefix_start_is_searched_from_three_blocks_before_l_q_to_l_q():
    auto = RegCacheOptions()
    assert start_range(auto, 5, "to_last") == [2, 3, 4, 5]
    assert start_range(auto, 1, "to_last") == [0, 1]
    assert start_range(auto, 5, "sensitive_only") == [5]
    assert start_range(RegCacheOptions(prefix_start=4), 5, "to_last") == [4]


def test_settings_name_their_variant_and_the_blocks_they_prefix():
    both = RegCacheSettings(sensitive_layer=4, prefix_start=2, num_registers=3, delete_tokens=2)
    assert both.variant == "both" and list(both.prefixed_blocks(8)) == [2, 3, 4, 5, 6, 7]
    assert both.first_changed_block() == 2
    only_at_l_q = RegCacheSettings(4, 4, 3, 0, prefix_blocks="sensitive_only")
    assert only_at_l_q.variant == "prefix-only" and list(only_at_l_q.prefixed_blocks(8)) == [4]
    assert RegCacheSettings(4, 2, 0, 0).variant == "naive" and not RegCacheSettings(4, 2, 0, 0).prefixed_blocks(8)
    assert RegCacheSettings(4, 2, 0, 5).first_changed_block() == 4


def test_dinov2_is_prefixed_only_at_the_sensitive_block_by_default():
    adapter = build_tiny("hf-dinov2")
    recipe = {"calibration": {"num_samples": 16, "holdout": 4},
              "methods": [{"regcache": {"sensitive_layer": 1, "num_registers": 2, "delete_tokens": 0}}]}
    result = quantsink.quantize(adapter.model, recipe, progress=False)
    report = result.report["methods"]["regcache"]
    assert report["prefix_blocks"] == "sensitive_only" and report["prefix_start"] == 1
    prefixed = [block for block in range(result.adapter.num_blocks) if edits_of(result.adapter.attention(block)).prefix is not None]
    assert prefixed == [1]
    # a start cannot apply where the prefix goes only at l_q: refused, not ignored
    recipe["methods"][0]["regcache"]["prefix_start"] = 0
    with pytest.raises(UserError, match="regcache.prefix_start: 0 cannot apply, the prefix goes only at the sensitive block"):
        quantsink.quantize(build_tiny("hf-dinov2").model, recipe, progress=False)
    # the option overrides the family default
    recipe["methods"][0]["regcache"]["prefix_blocks"] = "to_last"
    recipe["methods"][0]["regcache"]["prefix_start"] = 0
    result = quantsink.quantize(build_tiny("hf-dinov2").model, recipe, progress=False)
    prefixed = [block for block in range(result.adapter.num_blocks) if edits_of(result.adapter.attention(block)).prefix is not None]
    assert prefixed == list(range(result.adapter.num_blocks))


@pytest.fixture(scope="module")
def planted_w8a8():
    return quantsink.quantize(build_planted_clip(seed=0), recipe_at("planted-clip-w8a8-regcache.yaml", 8, 8), progress=False)


@pytest.mark.slow
def test_sensitivity_covers_every_targeted_linear_and_explains_its_choice(planted_w8a8):
    report = planted_w8a8.report["methods"]["regcache"]
    sensitivity = report["sensitivity"]
    names = set(sensitivity["scores"])
    blocks = planted_w8a8.adapter.num_blocks
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        assert {f"encoder.layers.{block}.{kind}" for block in range(blocks)} <= names
    emergence = planted_sinks(build_planted_clip(seed=0)).emergence_block
    assert sensitivity["linear"] == f"encoder.layers.{emergence}.mlp.fc2" and report["sensitive_layer"] == emergence
    # block 0's selection head is fragile without massive inputs: the worst overall, and not chosen
    assert sensitivity["most_sensitive_overall"] == "encoder.layers.0.self_attn.out_proj"
    assert sensitivity["tied"][0]["linear"] == sensitivity["linear"] and sensitivity["tied"][0]["input_outlier_ratio"] > 10


@pytest.mark.slow
def test_the_search_judges_every_variant_on_images_that_built_nothing(planted_w8a8):
    report = planted_w8a8.report["methods"]["regcache"]
    validation = report["validation"]
    assert validation["images"] == 16 and validation["build_images"] == 48
    assert {"naive", "prefix-only", "delete-only", "both"} <= set(validation)
    for variant in ("naive", "prefix-only", "delete-only", "both"):
        assert {"centered_cosine_mean", "cosine_mean", "relative_l2", "rank_agreement"} <= set(validation[variant])
    chosen = validation["chosen"]["centered_cosine_mean"]
    assert chosen == max(validation[variant]["centered_cosine_mean"] for variant in ("naive", "prefix-only", "delete-only", "both"))
    assert report["cost"]["planned_passes"] <= 10 and report["cost"]["calibration_passes"] > 0


FIXTURES = {
    "planted": (lambda: build_planted_clip(seed=0), "planted-clip-w8a8-regcache.yaml"),
    "emergent": (lambda: build_emergent_clip(seed=0), "planted-clip-emergent-w8a8-regcache.yaml"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("weights, activations", BIT_WIDTHS)
def test_auto_regcache_is_never_worse_than_naive_on_holdout(fixture, weights, activations):
    build, recipe = FIXTURES[fixture]
    naive = quantsink.quantize(build(), recipe_at(recipe, weights, activations, False), progress=False).report["fidelity"]
    regcache = quantsink.quantize(build(), recipe_at(recipe, weights, activations), progress=False).report["fidelity"]
    assert regcache["centered_cosine_mean"] >= naive["centered_cosine_mean"], (regcache, naive)


@pytest.mark.slow
def test_on_the_emergent_fixture_both_parts_beat_each_part_tuned_on_its_own_at_w8a8():
    """Sinks there are recruited through attention and re-form after a deletion: the prefix stops
    the recruitment, the deletion removes the marks no prefix reaches, and only the pair holds."""
    build, recipe_name = FIXTURES["emergent"]
    recipe = recipe_at(recipe_name, 8, 8)
    result = quantsink.quantize(build(), recipe, progress=False)
    method = result.methods[0]
    assert method.settings.variant == "both"
    splits = recipe.calibration
    samples = load_samples(splits.data, "image", splits.num_samples, splits.holdout, splits.seed)
    fp = resolve(build())
    calibration = [fp.preprocess(batch) for batch in batched(samples.calibration, splits.batch_size)]
    holdout = [fp.preprocess(batch) for batch in batched(samples.holdout, splits.batch_size)]
    reference = embed_batches(fp, holdout)

    def centered(settings: RegCacheSettings) -> float:
        adapter = resolve(build())
        install(adapter, settings, method.registers)
        quantize_as_recipe(adapter, recipe.quantization, calibration)
        return fidelity(reference, embed_batches(adapter, holdout))["centered_cosine_mean"]

    validation = method.report["validation"]
    others = {variant: centered(RegCacheSettings(**validation[variant]["settings"])) for variant in ("naive", "prefix-only", "delete-only")}
    both = result.report["fidelity"]["centered_cosine_mean"]
    assert both > max(others.values()) + 0.02, (both, others)
