"""RegCache ablation on the planted-sink CLIP fixtures, at W8A8, W6A6 and W4A8 (per-channel
weights, per-tensor static activations, fake quant, min-max), every hyperparameter auto.

Per fixture and bit width, one search (`quantsink.quantize` with the fixture's recipe) tunes each
variant on its own on the validation split of the calibration images: naive, prefix-only,
delete-only and both; the shipped one is the best of them. Each variant is then installed on a
fresh copy of the model with its own tuned settings, quantized as the pipeline does (the
recipe's backend, calibrated on all calibration images, frozen) and measured on the holdout
images: centred cosine / rank agreement / relative L2 to full precision. Also: the search's
cost (measured, in units of the pipeline's calibration pass; and as planned, in full-precision
passes) and the largest |x| entering l_q's fc2 on the holdout images for naive, prefix-only and
both.

    python benchmarks/regcache_ablation.py [--quiet]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import quantsink
from quantsink.pipeline import quantize_as_recipe
from quantsink.data import batched, load_samples
from quantsink.evaluate import embed_batches, fidelity
from quantsink.methods.regcache import RegCacheSettings, Registers, install
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.planted_clip import build_planted_clip
from quantsink.testing.planted_clip_emergent import build_emergent_clip

RECIPES = Path(__file__).parents[1] / "recipes"
BIT_WIDTHS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8)}
VARIANTS = ("naive", "prefix-only", "delete-only", "both")
# (label, builder of a fresh full-precision model, recipe)
FIXTURES: tuple[tuple[str, Callable[[], nn.Module], str], ...] = (
    ("planted CLIP (sinks planted in block 0)", lambda: build_planted_clip(seed=0), "planted-clip-w8a8-regcache.yaml"),
    ("emergent CLIP (sinks recruited through attention)", lambda: build_emergent_clip(seed=0),
     "planted-clip-emergent-w8a8-regcache.yaml"),
)


def with_bits(recipe: Recipe, weights: int, activations: int) -> Recipe:
    quantization = recipe.quantization.model_copy(update={
        "weights": recipe.quantization.weights.model_copy(update={"bits": weights}),
        "activations": recipe.quantization.activations.model_copy(update={"bits": activations}),
    })
    return recipe.model_copy(update={"quantization": quantization, "name": f"{recipe.name}-w{weights}a{activations}"})


def quantized(build: Callable[[], nn.Module], recipe: Recipe, calibration: list, settings: RegCacheSettings,
              registers: Registers):
    """A fresh model with `settings` installed, quantized as the pipeline does: the recipe's
    backend prepared after the method, calibrated, frozen."""
    adapter = resolve(build())
    install(adapter, settings, registers)
    quantize_as_recipe(adapter, recipe.quantization, calibration)
    return adapter


def fc2_input_max(build: Callable[[], nn.Module], settings: RegCacheSettings, registers: Registers, holdout: list) -> float:
    """The largest |x| entering l_q's fc2 on `holdout`, full precision, with `settings` installed."""
    adapter = resolve(build())
    install(adapter, settings, registers)
    largest = []
    adapter.fc2(settings.sensitive_layer).register_forward_pre_hook(lambda _module, args: largest.append(args[0].abs().max().item()))
    embed_batches(adapter, holdout)
    return max(largest)


def fixture_rows(label: str, build: Callable[[], nn.Module], recipe_name: str, progress: bool) -> list[str]:
    recipe = Recipe.from_yaml(RECIPES / recipe_name)
    settings = recipe.calibration
    samples = load_samples(settings.data, "image", settings.num_samples, settings.holdout, settings.seed)
    full_precision = resolve(build())
    calibration = [full_precision.preprocess(batch) for batch in batched(samples.calibration, settings.batch_size)]
    holdout = [full_precision.preprocess(batch) for batch in batched(samples.holdout, settings.batch_size)]
    reference = embed_batches(full_precision, holdout)
    rows = []
    for bits_label, bits in BIT_WIDTHS.items():
        bit_recipe = with_bits(recipe, *bits)
        result = quantsink.quantize(build(), bit_recipe, progress=progress)
        method = result.methods[0]
        report = method.report
        tuned = {variant: RegCacheSettings(**report["validation"][variant]["settings"]) for variant in VARIANTS}
        cells = []
        for variant in VARIANTS:
            scores = fidelity(reference, embed_batches(quantized(build, bit_recipe, calibration, tuned[variant], method.registers), holdout))
            cells.append(f"{scores['centered_cosine_mean']:.4f} / {scores['rank_agreement']:.3f} / {scores['relative_l2']:.3f}")
        shipped = fidelity(reference, embed_batches(result.adapter, holdout))
        norms = " / ".join(f"{fc2_input_max(build, tuned[variant], method.registers, holdout):.0f}"
                           for variant in ("naive", "prefix-only", "both"))
        chosen = method.settings
        cost = report["cost"]
        rows.append(
            f"| {label} | {bits_label} | " + " | ".join(cells) + f" | {chosen.variant}: {shipped['centered_cosine_mean']:.4f} | "
            f"l_q {chosen.sensitive_layer}; " + "; ".join(
                f"{variant} s{tuned[variant].prefix_start} t{tuned[variant].num_registers} k{tuned[variant].delete_tokens}"
                for variant in ("prefix-only", "delete-only", "both")) + f" | {norms} | "
            f"{cost['calibration_passes']:.1f}x ({cost['planned_passes']:.1f} planned, {cost['quantized_trials']} trials) |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("holdout fidelity to full precision, each variant tuned on its own: centred cosine / rank agreement / "
          "relative L2 (higher / higher / lower is better)")
    print("| fixture | bits | naive | prefix-only | delete-only | both | shipped | tuned settings (start, tau, k~) | "
          "max l_q fc2 input: naive / prefix-only / both | search cost (calibration passes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, build, recipe_name in FIXTURES:
        for row in fixture_rows(label, build, recipe_name, not args.quiet):
            print(row, flush=True)


if __name__ == "__main__":
    main()
