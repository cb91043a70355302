"""End-to-end CPU latency of real int8 execution on a ViT-B/16-size model, and checkpoint sizes.

    python benchmarks/int8_speed.py [--threads 2] [--batch 8] [--repeats 7]

The model is a transformers CLIPVisionModel with the CLIP ViT-B/16 configuration (86M
parameters, 197 tokens) and random weights: speed does not depend on the weights. Every
variant is quantized through `quantsink.quantize` (calibrated on the bundled photographs) and
timed in the same process on the same batch; the timing rounds interleave the variants, so
that a change of machine load hits them all alike. Latency is the median over the rounds after
one warm-up call each; ratios are fp32 latency / variant latency (higher is faster). The
machine's load average is printed beside them: on a shared machine other processes preempt
torch's threads, which slows every variant but a 2-thread one most (each parallel op waits for
its slowest thread), so `--threads 1` gives the steadier ratios there.
Checkpoint sizes are those of `model.safetensors`: fp32 as saved unquantized, and the int8
export of the W8A8 static model."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import quantsink
from quantsink.models import resolve, save_model

CALIBRATION = {"data": "bundled", "num_samples": 8, "batch_size": 8, "holdout": 8, "seed": 0}
PER_TOKEN = {"granularity": "per_token", "dynamic": True}
STATIC = "quantsink int8 W8A8 per-tensor static"
# name -> (quantization section, export format)
VARIANTS = {
    STATIC: ({"backend": "int8"}, "int8"),
    "quantsink int8 W8A8 per-token dynamic": ({"backend": "int8", "activations": PER_TOKEN}, "int8"),
    "torchao int8 W8A8 per-token dynamic": ({"backend": "torchao", "activations": PER_TOKEN}, "fake-quant"),
}


def vit_b16() -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=16)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def recipe(quantization: dict, export_format: str) -> dict:
    return {"name": "int8-speed", "calibration": CALIBRATION, "quantization": quantization, "export": {"format": export_format}}


def timed(model: torch.nn.Module, pixels: torch.Tensor) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        model(pixel_values=pixels)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every variant (default 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = vit_b16()
    models = {"fp32": fp32}
    results = {}
    for name, (quantization, export_format) in VARIANTS.items():
        results[name] = quantsink.quantize(copy.deepcopy(fp32), recipe(quantization, export_format), progress=False)
        models[name] = results[name].model

    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for model in models.values():
        timed(model, pixels)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            seconds[name].append(timed(model, pixels))

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"CLIP ViT-B/16 vision tower (random weights), batch {args.batch}, 224x224, "
          f"{args.threads} torch threads, median of {args.repeats} interleaved rounds; "
          f"load average {load} on {os.cpu_count()} CPUs")
    baseline = statistics.median(seconds["fp32"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:<42} {median * 1000:8.0f} ms   {baseline / median:5.2f}x fp32")

    with tempfile.TemporaryDirectory() as scratch:
        fp32_folder = save_model(resolve(fp32), Path(scratch) / "fp32")
        int8_folder = results[STATIC].save(Path(scratch) / "int8")
        fp32_bytes = (fp32_folder / "model.safetensors").stat().st_size
        int8_bytes = (int8_folder / "model.safetensors").stat().st_size
    print(f"checkpoint: fp32 {fp32_bytes / 2**20:.1f} MiB, int8 export {int8_bytes / 2**20:.1f} MiB, "
          f"ratio {int8_bytes / fp32_bytes:.3f}")


if __name__ == "__main__":
    main()
