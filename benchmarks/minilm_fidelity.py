"""Fidelity of the real all-MiniLM-L6-v2 under several quantization settings, side by side.

    python benchmarks/minilm_fidelity.py [--samples 128] [--holdout 64]

Each row quantizes a fresh copy of the model on the same bundled calibration paragraphs and
measures cosine similarity to full precision on the same disjoint holdout paragraphs. The first
row is the recipe the README runs (W8A8, per-tensor static, min-max)."""
from __future__ import annotations

import argparse
import logging

import quantsink

SETTINGS = {
    "W8A8 per-tensor static minmax": {"activations": {"observer": "minmax"}},
    "W8A8 per-tensor static percentile": {"activations": {"observer": "percentile"}},
    "W8A8 per-tensor static mse": {"activations": {"observer": "mse"}},
    "W8A8 per-token dynamic": {"activations": {"granularity": "per_token", "dynamic": True}},
    "W8 weights only": {"activations": None},
    "W4 per-group(32) weights only": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 32}, "activations": None},
    "W6A6 per-tensor static minmax": {"weights": {"bits": 6}, "activations": {"bits": 6}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{'setting':36s} {'cos mean':>9s} {'cos min':>9s} {'rel L2':>8s}")
    for label, quantization in SETTINGS.items():
        recipe = {
            "name": "bench",
            "calibration": {"num_samples": args.samples, "holdout": args.holdout, "batch_size": 16},
            "quantization": quantization,
        }
        report = quantsink.quantize("all-minilm-l6-v2", recipe, progress=False).report
        fidelity = report["fidelity"]
        print(f"{label:36s} {fidelity['cosine_mean']:9.4f} {fidelity['cosine_min']:9.4f} {fidelity['relative_l2']:8.4f}", flush=True)


if __name__ == "__main__":
    main()
