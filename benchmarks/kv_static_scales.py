"""Sink-aware static KV scales (issue 13): static per-tensor and per-head scales of the keys and
values, int8, fp8 (e4m3) and int4, calibrated with every token in their range (what engines and
llm-compressor do) or with the KVSink-predicted sinks left out (`kv_cache.sinks`), each
evaluated with the sinks kept exact at inference (quantsink) and with the sinks quantized too
(what transformers and vLLM compute from the exported k_scale/v_scale):

* perplexity and mean KL(full precision || quantized) of the next-token predictions on held-out
  text under the chunked-prefill protocol of benchmarks/kv_cache.py (compare_kv_caches: each
  chunk sees the earlier ones as the cache holds them; here the static scales quantize every
  call's keys and values, the current chunk's too), on each model of its MODELS;
* the largest key scale over the layers with and without the sinks, in the grid's units;
* what keeping the sinks exact costs a prefill (kvsink scores each call's tokens first, in a
  forward that stops at the emergence block): median time of one forward of 8 x 128 tokens.

The sinks are the recipe's kvsink-5 top-k (`min_score: 0`; profile from the calibration text),
decided per forward call, each row keeping its best 5 offered tokens.

    python benchmarks/kv_static_scales.py [--segments 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

import quantsink
from quantsink.evaluate import compare_kv_caches
from quantsink.methods.kv_static import install, largest_level

from kv_cache import MODELS

CALIBRATION = {"data": "bundled", "num_samples": 16, "batch_size": 8, "seed": 0, "holdout": 16, "seq_len": 128}
SINKS = {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 0.0}}
GRIDS = {"int8": {"bits": 8, "type": "int"}, "fp8 e4m3": {"bits": 8, "type": "float"}, "int4": {"bits": 4, "type": "int"}}
GRANULARITIES = ("per_tensor", "per_head")
# (scales calibrated with the sinks in range?, sinks at inference)
ROWS = ((True, "quantized"), (True, "exact"), (False, "exact"), (False, "quantized"))


class AgainstFullPrecision(nn.Module):
    """One model for compare_kv_caches that runs the reference cache's chunks through the
    full-precision model and every other cache's through the quantized one, so the KL is the
    quantized model's against the model it was quantized from, both fed in lockstep."""

    def __init__(self, full_precision: nn.Module, quantized: nn.Module):
        super().__init__()
        self.full_precision, self.quantized = full_precision, quantized
        self.reference = DynamicCache()

    def forward(self, past_key_values=None, **kwargs):
        model = self.full_precision if past_key_values is self.reference else self.quantized
        return model(past_key_values=past_key_values, **kwargs)


def kv_static(grid: dict, granularity: str, sinks: dict) -> dict:
    return {"calibration": CALIBRATION,
            "kv_cache": {"scales": "static", **grid, "keys": {"granularity": granularity},
                         "values": {"granularity": granularity}, "sinks": sinks}}


def scales_of(result):
    method = next(method for method in result.methods if method.name == "kv-static")
    return method.key_scales, method.value_scales


def table(name: str, folder: Path, full_precision: nn.Module, segments: torch.Tensor, chunk_size: int) -> None:
    print(f"\n## {name}: {segments.shape[0]} held-out segments x {segments.shape[1]} tokens, chunks of {chunk_size}")
    print("| grid | scales | scales calibrated | sinks at inference | largest key |x| in range | perplexity | KL (nats/token) |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    reference = None
    for grid_name, grid in GRIDS.items():
        for granularity in GRANULARITIES:
            included = quantsink.quantize(str(folder), kv_static(grid, granularity, {"method": "none"}), progress=False)
            excluded = quantsink.quantize(str(folder), kv_static(grid, granularity, SINKS), progress=False)
            scheme = excluded.recipe.kv_cache
            scales = {True: scales_of(included), False: scales_of(excluded)}
            for in_range, at_inference in ROWS:
                # the sink-excluded model carries the kvsink predictor that `exact` needs
                sinks = scheme.sinks.model_copy(update={"at_inference": at_inference})
                install(excluded.adapter, *scales[in_range], scheme.bits, scheme.type, sinks)
                judge = AgainstFullPrecision(full_precision, excluded.model)
                comparison = compare_kv_caches(judge, segments, DynamicCache(), chunk_size=chunk_size, reference=judge.reference)
                if reference is None:
                    reference = comparison.perplexity_reference
                    print(f"| (full precision) | | | | | {reference:.2f} | 0 |")
                largest = float(scales[in_range][0].max()) * largest_level(scheme.bits, scheme.type)
                calibrated = "all tokens" if in_range else "kvsink-5 left out"
                print(f"| {grid_name} | {granularity} | {calibrated} | {at_inference} | {largest:.2f} | "
                      f"{comparison.perplexity_quantized:.2f} | {comparison.kl_mean:.5f} |")


def prefill_cost(name: str, folder: Path, segments: torch.Tensor, repeats: int) -> str:
    """Median seconds of one cached forward of the first 8 segments, fp8 per tensor, sinks
    quantized (no prediction) against exact (kvsink's partial forward first), interleaved."""
    result = quantsink.quantize(str(folder), kv_static(GRIDS["fp8 e4m3"], "per_tensor", SINKS), progress=False)
    scheme, (keys, values) = result.recipe.kv_cache, scales_of(result)
    ids = segments[:8]
    seconds = {"quantized": [], "exact": []}
    for _ in range(repeats):
        for at_inference in seconds:
            install(result.adapter, keys, values, scheme.bits, scheme.type,
                    scheme.sinks.model_copy(update={"at_inference": at_inference}))
            started = time.perf_counter()
            result.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            seconds[at_inference].append(time.perf_counter() - started)
    exact, quantized = statistics.median(seconds["exact"]), statistics.median(seconds["quantized"])
    emergence = next(method.profile for method in result.methods if method.name == "kvsink").emergence_layer
    return (f"| {name} | {emergence} of {result.adapter.num_blocks} | {quantized * 1e3:.1f} ms | {exact * 1e3:.1f} ms | "
            f"{exact / quantized:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=32, help="held-out segments per model")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    costs = []
    for model in MODELS:
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
            folder = model.save(Path(scratch) / "model")
            full_precision, tokenizer = model.load()
            segments = model.heldout(tokenizer)[: args.segments]
            table(model.name, folder, full_precision.eval(), segments, args.chunk_size)
            costs.append(prefill_cost(model.name, folder, segments, args.repeats))
    print(f"\n## prefill of 8 x 128 tokens, fp8 per tensor, kvsink-5 ({args.threads} threads, median of {args.repeats})")
    print("| model | emergence block | sinks quantized | sinks exact | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    print("\n".join(costs))


if __name__ == "__main__":
    main()
