"""RegCache ablation: naive / prefix-only / delete-only / both, fidelity to full precision on the
holdout images (cosine mean, and relative L2), at W8A8, W6A6 and W4A8 (per-channel weights,
per-tensor static activations, fake quant, min-max), on the planted-sink CLIP fixture.

For each bit width RegCache is searched with that quantizer in the loop (recipes/planted-clip-
w8a8-regcache.yaml with the bits changed: every hyperparameter auto); prefix-only and delete-only
keep the chosen prefix or deletion and drop the other part. all-MiniLM-L6-v2, the only real
checkpoint available offline, is a text encoder: RegCache does not apply to it (its sink tokens are
not image patches and its embedding pools over the attention mask outside the model, so tokens
cannot be deleted); its naive fidelity is printed for reference.

    python benchmarks/regcache_ablation.py [--quiet]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import quantsink
from quantsink.data import batched, load_samples
from quantsink.evaluate import embed_batches, fidelity
from quantsink.methods.regcache import RegCacheSettings, Registers, install
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.registry import QUANTIZERS
from quantsink.testing.planted_clip import build_planted_clip

RECIPES = Path(__file__).parents[1] / "recipes"
BIT_WIDTHS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8)}


def with_bits(recipe: Recipe, weights: int, activations: int) -> Recipe:
    quantization = recipe.quantization.model_copy(update={
        "weights": recipe.quantization.weights.model_copy(update={"bits": weights}),
        "activations": recipe.quantization.activations.model_copy(update={"bits": activations}),
    })
    return recipe.model_copy(update={"quantization": quantization, "name": f"{recipe.name}-w{weights}a{activations}"})


def quantized(recipe: Recipe, calibration: list, settings: RegCacheSettings | None, registers: Registers | None):
    """A fresh planted model with `settings` installed (None: none), quantized as the pipeline
    does: the recipe's backend prepared after the method, calibrated, frozen."""
    adapter = resolve(build_planted_clip(seed=0))
    if settings is not None:
        install(adapter, settings, registers)
    quantizer = QUANTIZERS.get(recipe.quantization.backend)(recipe.quantization)
    quantizer.prepare(adapter.model)
    with quantizer.calibrating(adapter.model):
        embed_batches(adapter, calibration)
    quantizer.freeze(adapter.model)
    return adapter


def planted_rows(progress: bool) -> list[str]:
    recipe = Recipe.from_yaml(RECIPES / "planted-clip-w8a8-regcache.yaml")
    settings = recipe.calibration
    samples = load_samples(settings.data, "image", settings.num_samples, settings.holdout, settings.seed)
    full_precision = resolve(build_planted_clip(seed=0))
    calibration = [full_precision.preprocess(batch) for batch in batched(samples.calibration, settings.batch_size)]
    holdout = [full_precision.preprocess(batch) for batch in batched(samples.holdout, settings.batch_size)]
    reference = embed_batches(full_precision, holdout)
    rows = []
    for label, bits in BIT_WIDTHS.items():
        bit_recipe = with_bits(recipe, *bits)
        result = quantsink.quantize(build_planted_clip(seed=0), bit_recipe, progress=progress)
        method = result.methods[0]
        chosen = method.settings
        variants = {
            "naive": quantized(bit_recipe, calibration, None, None),
            "prefix-only": quantized(bit_recipe, calibration, dataclasses.replace(chosen, delete_tokens=0), method.registers),
            "delete-only": quantized(bit_recipe, calibration, dataclasses.replace(chosen, num_registers=0), method.registers),
            "both": result.adapter,
        }
        cells = []
        for adapter in variants.values():
            scores = fidelity(reference, embed_batches(adapter, holdout))
            cells.append(f"{scores['cosine_mean']:.4f} / {scores['relative_l2']:.3f}")
        cost = method.report["cost"]
        rows.append(f"| planted CLIP | {label} | " + " | ".join(cells) + f" | l_q {chosen.sensitive_layer}, start "
                    f"{chosen.prefix_start}, tau {chosen.num_registers}, k~ {chosen.delete_tokens} | "
                    f"{cost['reference_passes']:.1f}x ({cost['quantized_trials']} trials) |")
    return rows


def minilm_rows(progress: bool) -> list[str]:
    recipe = Recipe.from_yaml(RECIPES / "all-minilm-l6-v2-w8a8.yaml")
    rows = []
    for label, bits in BIT_WIDTHS.items():
        scores = quantsink.quantize("all-minilm-l6-v2", with_bits(recipe, *bits), progress=progress).report["fidelity"]
        rows.append(f"| all-MiniLM-L6-v2 | {label} | {scores['cosine_mean']:.4f} / {scores['relative_l2']:.3f} | "
                    "n/a | n/a | n/a | text encoder: RegCache does not apply | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("holdout fidelity to full precision: cosine mean / relative L2 (higher / lower is better)")
    print("| model | bits | naive | prefix-only | delete-only | both | chosen by the search | search cost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in planted_rows(not args.quiet) + minilm_rows(not args.quiet):
        print(row, flush=True)


if __name__ == "__main__":
    main()
