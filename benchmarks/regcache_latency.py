"""Inference latency with and without RegCache, same quantizer: a ViT-B/16-size CLIP vision tower
(transformers CLIPVisionConfig with patch 16, random weights), batch 8, fake-quant W8A8.

RegCache's cost does not depend on the weights: tau registers in front of the keys and values of
every block from prefix_start (one entry weighted log(tau) per attention, see
quantsink.methods.regcache, attended apart from the sequence's own keys and merged by logsumexp,
see quantsink.models.attention.attend), and k~ tokens gathered out at block l_q. Deleting tokens
shortens the sequence and so saves time; the prefix alone shows the overhead. Settings: prefix
from block 3 (of 12), tau 15; deletion at block 5, k~ 10 (the top of the searched ranges).

    python benchmarks/regcache_latency.py [--repeats 10] [--threads N]

Prints, per model, the median and minimum wall time and the median CPU time (all threads) per
batch, the models run interleaved in rotating order so that each sees the same machine load, and
the ratios to the model without RegCache (issue 3 acceptance: at most 1.05x).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from quantsink.methods.regcache import Registers, RegCacheSettings, install
from quantsink.models.hf import HFCLIPAdapter
from quantsink.recipe import QuantizationConfig
from quantsink.registry import QUANTIZERS

BATCH = 8
BOTH = RegCacheSettings(sensitive_layer=5, prefix_start=3, num_registers=15, delete_tokens=10)
VARIANTS = {"without RegCache": None, "prefix only": dataclasses.replace(BOTH, delete_tokens=0), "RegCache": BOTH}
W8A8 = {"weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False}}


def build(settings: RegCacheSettings | None, calibration: torch.Tensor) -> HFCLIPAdapter:
    torch.manual_seed(0)
    config = CLIPVisionConfig(patch_size=16, image_size=224, projection_dim=512)
    adapter = HFCLIPAdapter.from_module(CLIPVisionModelWithProjection(config).eval())
    if settings is not None:
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        blocks = config.num_hidden_layers - settings.prefix_start
        registers = Registers(torch.randn(blocks, heads, head_dim), torch.randn(blocks, heads, head_dim), settings.prefix_start)
        install(adapter, settings, registers)
    quantization = QuantizationConfig.model_validate(W8A8)
    quantizer = QUANTIZERS.get(quantization.backend)(quantization)
    quantizer.prepare(adapter.model)
    with quantizer.calibrating(adapter.model):
        adapter.embed({"pixel_values": calibration})
    quantizer.freeze(adapter.model)
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models = {name: build(settings, pixels) for name, settings in VARIANTS.items()}
    inputs = {"pixel_values": pixels}
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for adapter in models.values():
            adapter.embed(inputs)  # warm-up
        names = list(models)
        for repeat in range(args.repeats):
            # each model takes each place in the round equally often: the one after another
            # model's pass runs on warmer caches, or on a CPU that another engineer's job just left
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                adapter = models[name]
                started, started_cpu = time.perf_counter(), time.process_time()
                adapter.embed(inputs)
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    print(f"CLIP ViT-B/16 vision tower, random weights, batch {BATCH}, fake-quant W8A8 (same quantizer for all), "
          f"{args.threads} threads, {args.repeats} interleaved repeats")
    print(f"RegCache: prefix from block {BOTH.prefix_start} of 12, tau {BOTH.num_registers}; "
          f"deletion of {BOTH.delete_tokens} tokens at block {BOTH.sensitive_layer}")
    print(f"{'model':<18}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}{'ratio median':>14}{'ratio min':>11}{'ratio cpu':>11}")
    base = "without RegCache"
    for name in models:
        median, fastest, used = (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name]))
        print(f"{name:<18}{1000 * median:>11.1f}{1000 * fastest:>9.1f}{1000 * used:>9.1f}"
              f"{median / statistics.median(wall[base]):>13.3f}x{fastest / min(wall[base]):>10.3f}x"
              f"{used / statistics.median(cpu[base]):>10.3f}x")


if __name__ == "__main__":
    main()
