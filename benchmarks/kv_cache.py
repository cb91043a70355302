"""KV-cache quantization on the planted-sink Llama, side by side in one run:

1. perplexity and KL(full precision || quantized) on the held-out text for full precision, no
   sink protection, PFN-1, PFN-5 and KVSink-5 (sinks predicted by the profile quantsink found on
   the calibration text) at 2, 3 and 4 bits, with the bytes per token each costs vs fp16;
2. the KVSink prediction's share of prefill time (the hook on the emergence block) on the
   fixture and on a Llama of 1B-class width;
3. perplexity of transformers' own QuantizedCache (quanto backend) at the settings it supports,
   and decode-step latency of SinkQuantizedCache vs it at equal bits and vs the
   full-precision DynamicCache.

    python benchmarks/kv_cache.py [--segments 90] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import quantsink
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.attach import build_kv_cache
from quantsink.methods.kvsink import SinkProfile, install
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import planted_segments, save_planted_llama

RECIPE = Path(__file__).parents[1] / "recipes" / "planted-llama-kv2-kvsink.yaml"
PARTS = ("perplexity", "overhead", "decode")
STRATEGIES = {
    "none": {"method": "none"},
    "pfn-1": {"method": "pfn", "num_sinks": 1},
    "pfn-5": {"method": "pfn", "num_sinks": 5},
    "kvsink-5": {"method": "kvsink", "num_sinks": 5},
}


def with_kv(recipe: Recipe, **changes) -> Recipe:
    data = recipe.to_dict()
    data["kv_cache"].update(changes)
    return Recipe.from_dict(data)


def perplexity_table(result, segments: torch.Tensor, chunk_size: int) -> None:
    print(f"\n## perplexity and KL, {segments.shape[0]} held-out segments x {segments.shape[1]} tokens, chunks of {chunk_size}")
    print("| bits | sinks | perplexity | KL (nats/token) | bytes/token | vs fp16 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    reference = None
    for bits in (2, 3, 4):
        for name, sinks in STRATEGIES.items():
            config = with_kv(result.recipe, bits=bits, sinks=sinks).kv_cache
            cache = build_kv_cache(config, result.adapter)
            comparison = compare_kv_caches(result.model, segments, cache, chunk_size=chunk_size)
            if reference is None:
                reference = comparison.perplexity_reference
                print(f"| 16 | (full precision) | {reference:.2f} | 0 | {cache.memory().baseline / cache.memory().tokens:.0f} | 1.00x |")
            memory = cache.memory()
            print(f"| {bits} | {name} | {comparison.perplexity_quantized:.2f} | {comparison.kl_mean:.4f} | "
                  f"{memory.bytes_per_token:.0f} | {memory.compression:.2f}x |")


def baseline_table(result, segments: torch.Tensor, chunk_size: int) -> None:
    """transformers' QuantizedCache against SinkQuantizedCache at the settings both support:
    per-token keys and values in groups of 16 channels, the last 16 tokens kept exact."""
    print(f"\n## vs transformers' QuantizedCache (quanto): per-token keys, groups of 16, residual 16, chunks of {chunk_size}")
    print("| bits | cache | perplexity | KL (nats/token) |")
    print("| ---: | --- | ---: | ---: |")
    same = dict(keys={"granularity": "per_token", "pre_rope": False}, group_size=16, residual_length=16)
    for bits in (2, 4):
        for label, changes in (
            ("transformers QuantizedCache", dict(backend="transformers-quanto", sinks={"method": "none"})),
            ("quantsink, sinks none", dict(sinks={"method": "none"})),
            ("quantsink, kvsink-5", {}),
        ):
            config = with_kv(result.recipe, bits=bits, **same, **changes).kv_cache
            comparison = compare_kv_caches(result.model, segments, build_kv_cache(config, result.adapter), chunk_size=chunk_size)
            print(f"| {bits} | {label} | {comparison.perplexity_quantized:.2f} | {comparison.kl_mean:.4f} |")


def timed(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prediction_overhead(adapter, profile: SinkProfile, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a prefill of `ids` through a 2-bit kvsink cache and through a 2-bit pfn-5
    cache (the same quantization work, no prediction), and of the predictor hook alone. The hook
    is timed by a forward hook just before it and one just after it on the same block, with a
    16-bit kvsink cache: there `offer_sinks` stores nothing, so what is timed is the prediction
    (score, threshold, top-k per row), not the quantization the decision releases."""
    install(adapter, profile)
    block = adapter.blocks()[profile.emergence_layer]
    base = with_kv(Recipe.from_yaml(RECIPE), bits=2, residual_length=128, group_size=32)

    def prefill(config):
        def run():
            with torch.no_grad():
                adapter.model(ids, past_key_values=build_kv_cache(config, adapter), use_cache=True)

        return run

    kvsink, pfn = base.kv_cache, with_kv(base, sinks={"method": "pfn", "num_sinks": 5}).kv_cache
    seconds = {"kvsink": [], "pfn-5": []}
    for _ in range(repeats):  # interleaved, so drifting load hits both alike
        seconds["kvsink"].append(timed(prefill(kvsink), 1))
        seconds["pfn-5"].append(timed(prefill(pfn), 1))
    starts, hook_seconds = [], []
    before = block.register_forward_hook(lambda *_: starts.append(time.perf_counter()), prepend=True)
    after = block.register_forward_hook(lambda *_: hook_seconds.append(time.perf_counter() - starts[-1]))
    try:
        timed(prefill(with_kv(base, bits=16).kv_cache), repeats)
    finally:
        before.remove()
        after.remove()
    return {"kvsink": statistics.median(seconds["kvsink"]), "pfn-5": statistics.median(seconds["pfn-5"]),
            "predictor": statistics.median(hook_seconds)}


def wide_llama(layers: int = 4) -> tuple:
    """Random weights at Llama-3.2-1B width (hidden 2048, 32 heads, 8 kv heads), `layers` deep,
    with an outlier channel planted by hand at block 1 for the profile."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    adapter = resolve(model)
    profile = SinkProfile(emergence_layer=1, channels=[1415], threshold=100.0, scale=1.0, peak=1000.0, layer_ratios=[1.0] * layers)
    return adapter, profile


def decode_latency(adapter, profile: SinkProfile, prompt_length: int, steps: int, bits: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step (generate with `steps` new tokens minus generate with one, over
    steps - 1), per-token keys and values in groups of 64 channels and a residual window of 128
    for both quantized caches."""
    model = adapter.model
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_length))
    install(adapter, profile)
    base = Recipe.from_yaml(RECIPE)
    same = dict(bits=bits, residual_length=128, group_size=64, keys={"granularity": "per_token", "pre_rope": False})
    ours = with_kv(base, **same).kv_cache
    theirs = with_kv(base, **same, backend="transformers-quanto", sinks={"method": "none"}).kv_cache
    caches = {
        "DynamicCache (fp)": lambda: DynamicCache(),
        f"transformers QuantizedCache quanto {bits}-bit": lambda: build_kv_cache(theirs, adapter),
        f"quantsink SinkQuantizedCache {bits}-bit kvsink-5": lambda: build_kv_cache(ours, adapter),
    }

    def run(make_cache):
        with torch.no_grad():
            model.generate(ids, past_key_values=make_cache(), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    prefill_only = {name: timed(lambda make=make: _prefill(model, ids, make), repeats) for name, make in caches.items()}
    total = {name: timed(lambda make=make: run(make), repeats) for name, make in caches.items()}
    return {name: (total[name] - prefill_only[name]) / (steps - 1) for name in caches}


def _prefill(model, ids, make_cache) -> None:
    with torch.no_grad():
        model.generate(ids, past_key_values=make_cache(), max_new_tokens=1, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=90, help="held-out segments of 128 tokens")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        folder = save_planted_llama(Path(scratch) / "planted-llama")
        result = quantsink.quantize(str(folder), RECIPE, progress=False)
    profile = result.methods[0].profile
    print(f"kvsink profile: emergence block {profile.emergence_layer}, channels {profile.channels}, "
          f"peak {profile.peak:.1f} = {profile.peak / profile.scale:.0f}x a typical token's RMS")
    segments = planted_segments(result.adapter.processor, "heldout")[: args.segments]
    if "perplexity" in args.parts:
        perplexity_table(result, segments, args.chunk_size)
        baseline_table(result, segments, args.chunk_size)
    wide, wide_profile = wide_llama()

    if "overhead" in args.parts:
        overhead_table(result.adapter, profile, segments, wide, wide_profile, args)
    if "decode" in args.parts:
        decode_table(wide, wide_profile, args)


def overhead_table(adapter, profile, segments, wide, wide_profile, args) -> None:
    print(f"\n## KVSink prediction overhead at prefill ({args.threads} threads, median of {args.repeats})")
    print("| model | prompt | prefill, 2-bit kvsink-5 | prefill, 2-bit pfn-5 | ratio | predictor alone | share |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, model_adapter, model_profile, ids in (
        ("planted Llama (hidden 256, 6 layers)", adapter, profile, segments[:8]),
        ("Llama 1B width (hidden 2048, 4 layers, random)", wide, wide_profile, torch.randint(0, 32000, (1, 512))),
    ):
        measured = prediction_overhead(model_adapter, model_profile, ids, args.repeats)
        print(f"| {label} | {ids.shape[0]} x {ids.shape[1]} | {measured['kvsink'] * 1e3:.1f} ms | {measured['pfn-5'] * 1e3:.1f} ms | "
              f"{measured['kvsink'] / measured['pfn-5']:.3f}x | {measured['predictor'] * 1e3:.3f} ms | "
              f"{measured['predictor'] / measured['kvsink']:.2%} |")


def decode_table(wide, wide_profile, args) -> None:
    print(f"\n## decode step latency, Llama 1B width (4 layers, random), prompt 512, 64 new tokens, batch 1")
    print("| cache | ms per decode step | vs DynamicCache |")
    print("| --- | ---: | ---: |")
    for bits in (2, 4):
        latency = decode_latency(wide, wide_profile, 512, 64, bits, args.repeats)
        base = latency["DynamicCache (fp)"]
        for name, seconds in latency.items():
            if bits == 4 and name.startswith("DynamicCache"):
                continue
            print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
