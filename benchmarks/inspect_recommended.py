"""`quantsink inspect`'s recommended recipe against the shipped recipe of each fixture, both run
with the shipped recipe's calibration and holdout split (what tests/inspect/test_inspect_recommended.py
asserts, with the numbers): the planted CLIPs' holdout centred cosine, the Llamas' KV-cache KL.

    python benchmarks/inspect_recommended.py
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from quantsink import api
from quantsink.inspection.run import inspect
from quantsink.recipe import Recipe
from quantsink.testing.planted_clip import build_planted_clip
from quantsink.testing.planted_clip_emergent import build_emergent_clip
from quantsink.testing.planted_llm import save_planted_llama
from quantsink.testing.planted_llm_realistic import save_realistic_llama
from quantsink.testing.sink_lm import sink_lm_path

VISION = (("planted CLIP", build_planted_clip, "recipes/planted-clip-w8a8-regcache.yaml"),
          ("emergent CLIP", build_emergent_clip, "recipes/planted-clip-emergent-w8a8-regcache.yaml"))
LLMS = (("planted Llama", save_planted_llama, "recipes/planted-llama-kv2-kvsink.yaml"),
        ("realistic Llama", save_realistic_llama, "recipes/planted-llama-kv2-kvsink.yaml"),
        ("sink-lm (trained)", None, "recipes/sink-lm-kv2-kvsink.yaml"))


def matched(recommended: Recipe, default: Recipe) -> Recipe:
    return Recipe.from_dict({**recommended.to_dict(), "calibration": default.calibration.model_dump()})


def main() -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    print("| fixture | shipped recipe | recommended | metric | shipped | recommended |")
    print("| --- | --- | --- | --- | ---: | ---: |")
    for name, build, path in VISION:
        default = Recipe.from_yaml(path)
        recommended = inspect(build(seed=0), num_samples=default.calibration.num_samples, progress=False).recommend()
        scores = [api.quantize(build(seed=0), recipe, progress=False).report["fidelity"]["centered_cosine_mean"]
                  for recipe in (default, matched(recommended, default))]
        print(f"| {name} | {Path(path).name} | {json.dumps(recommended.methods[0]['regcache'])} | holdout centred cosine | "
              f"{scores[0]:.4f} | {scores[1]:.4f} |")
    with tempfile.TemporaryDirectory() as scratch:
        for name, save, path in LLMS:
            folder = sink_lm_path() if save is None else save(Path(scratch) / name.split()[0])
            default = Recipe.from_yaml(path)
            recommended = inspect(str(folder), num_samples=default.calibration.num_samples, progress=False).recommend()
            kv = [api.quantize(str(folder), recipe, progress=False).report["kv_cache"]
                  for recipe in (default, matched(recommended, default))]
            sinks = recommended.kv_cache.sinks
            # exact layers buy their KL with bytes: both are printed
            print(f"| {name} | {Path(path).name} | kvsink-{sinks.num_sinks}, min_score {sinks.profile.min_score:g}, "
                  f"exact_layers {recommended.kv_cache.exact_layers} | KV KL per token (bytes per token) | "
                  f"{kv[0]['kl_mean']:.5f} ({kv[0]['bytes_per_token']:.0f}) | {kv[1]['kl_mean']:.5f} ({kv[1]['bytes_per_token']:.0f}) |")


if __name__ == "__main__":
    main()
