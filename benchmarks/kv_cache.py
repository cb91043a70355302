"""KV-cache quantization of causal LMs with attention sinks, each model of MODELS side by side in
one run:

1. perplexity and mean KL(full precision || quantized) of the next-token predictions on held-out
   text under chunked prefill (each chunk sees the earlier ones only as the cache stores them),
   for full precision and, at 2, 3 and 4 bits with per-token and per-channel keys in KIVI's
   online groups and with KVQuant's pre-RoPE per-channel key ranges calibrated offline, for no
   sink protection, PFN-1, PFN-5, KVSink-5 (plain top-k, `min_score: 0`) and KVSink-5 with a
   threshold (`min_score: 100`), with the packed-storage bytes per token of each
   (quantsink.kv.storage);
2. transformers' own QuantizedCache (quanto backend) next to quantsink's cache without sinks at
   matched settings, each cache's settings printed from the cache objects;
3. the KVSink predictor's share of prefill time (the hook on the emergence block) on the first
   model and on a random-weight Llama of 1B-class width;
4. decode-step latency of SinkQuantizedCache and transformers' QuantizedCache against the
   full-precision DynamicCache at that width.

    python benchmarks/kv_cache.py [--segments 90] [--threads 1] [--parts perplexity baseline overhead decode]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import quantsink
from quantsink.evaluate import compare_kv_caches
from quantsink.kv.attach import build_kv_cache
from quantsink.methods.kvsink import SinkProfile, install
from quantsink.models import resolve
from quantsink.recipe import Recipe
from quantsink.testing.planted_llm import build_planted_llama, planted_segments
from quantsink.testing.planted_llm_realistic import build_realistic_llama
from quantsink.testing.sink_lm import heldout_segments, load_sink_lm

RECIPE = Path(__file__).parents[1] / "recipes" / "planted-llama-kv2-kvsink.yaml"
PARTS = ("perplexity", "baseline", "overhead", "decode")


def bundled_heldout(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The held-out part of the bundled text, in segments of 128 tokens, [BOS] first."""
    return planted_segments(tokenizer, "heldout")


@dataclass(frozen=True)
class BenchModel:
    """A model the tables cover: `load()` builds it and its tokenizer, `heldout(tokenizer)` gives
    its held-out text as (segments, tokens) ids."""

    name: str
    load: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    heldout: Callable[[PreTrainedTokenizerBase], torch.Tensor] = bundled_heldout

    def save(self, folder: Path) -> Path:
        """The model as a folder, the form `quantsink.quantize` takes a checkpoint in."""
        model, tokenizer = self.load()
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return folder


MODELS = [
    BenchModel("planted Llama (quantsink.testing.planted_llm)", build_planted_llama),
    BenchModel("realistic planted Llama (quantsink.testing.planted_llm_realistic)", build_realistic_llama),
    BenchModel("trained sink LM, held-out prose (quantsink.testing.sink_lm)", load_sink_lm),
    BenchModel("trained sink LM, Bigram-Backcopy (quantsink.testing.sink_lm)", load_sink_lm,
               lambda tokenizer: heldout_segments(tokenizer, "backcopy", 90)),
]
# kv_cache.sinks of each row; a kvsink entry's profile options configure the predictor quantsink installs
STRATEGIES = {
    "none": {"method": "none"},
    "pfn-1": {"method": "pfn", "num_sinks": 1},
    "pfn-5": {"method": "pfn", "num_sinks": 5},
    "kvsink-5 top-k": {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 0.0}},
    "kvsink-5 threshold (min_score 100)": {"method": "kvsink", "num_sinks": 5, "profile": {"min_score": 100.0}},
}
BITS = (2, 3, 4)
# kv_cache.keys of each row: KIVI's online groups per token or per channel, and KVQuant's pre-RoPE
# per-channel ranges calibrated offline (kv-static, on the tokens each row's sinks leave)
CALIBRATED_KEYS = {"granularity": "per_channel", "pre_rope": True, "ranges": "calibrated"}
KEYS = {
    "per_token": {"granularity": "per_token", "pre_rope": False},
    "per_channel": {"granularity": "per_channel", "pre_rope": False},
    "per_channel pre-RoPE calibrated": CALIBRATED_KEYS,
}
QUANTO_KEYS = ("per_token", "per_channel")
QUANTO_BITS = (2, 4)


def with_kv(recipe: Recipe, **changes) -> Recipe:
    data = recipe.to_dict()
    data["kv_cache"].update(changes)
    return Recipe.from_dict(data)


def calibrated(keys: dict) -> bool:
    return keys.get("ranges") == "calibrated"


def quantized(folder: Path, base: Recipe) -> dict[tuple[str, bool], object]:
    """One quantization of the model folder per sink strategy, and again with calibrated key
    ranges: a kvsink strategy's predictor is what its recipe installs, calibrated ranges are
    what kv-static finds beside that strategy's sinks (the rest runs on the model as it is)."""
    results = {}
    for name, sinks in STRATEGIES.items():
        recipe = with_kv(base, sinks=sinks)
        results[name, False] = quantsink.quantize(str(folder), recipe, progress=False)
        results[name, True] = quantsink.quantize(str(folder), with_kv(recipe, keys=CALIBRATED_KEYS), progress=False)
    return results


def kvsink_profile(result) -> SinkProfile:
    return next(method.profile for method in result.methods if method.name == "kvsink")


def perplexity_table(name: str, results: dict, segments: torch.Tensor, chunk_size: int) -> None:
    base = results["none", False].recipe.kv_cache
    print(f"\n## {name}: perplexity and KL, {segments.shape[0]} held-out segments x {segments.shape[1]} tokens, "
          f"chunks of {chunk_size}; groups of {base.group_size}, residual_length {base.residual_length}")
    print("| bits | keys | sinks | perplexity | KL (nats/token) | bytes/token | vs fp16 |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    reference = None
    for granularity, keys in KEYS.items():
        for bits in BITS:
            for strategy in STRATEGIES:
                result = results[strategy, calibrated(keys)]
                config = with_kv(result.recipe, bits=bits, keys=keys).kv_cache
                cache = build_kv_cache(config, result.adapter)
                comparison = compare_kv_caches(result.model, segments, cache, chunk_size=chunk_size)
                memory = cache.memory()
                if reference is None:
                    reference = comparison.perplexity_reference
                    print(f"| 16 | | (full precision) | {reference:.2f} | 0 | {memory.baseline / memory.tokens:.0f} | 1.00x |")
                print(f"| {bits} | {granularity} | {strategy} | {comparison.perplexity_quantized:.2f} | "
                      f"{comparison.kl_mean:.4f} | {memory.bytes_per_token:.0f} | {memory.compression:.2f}x |")
    for strategy in STRATEGIES:
        result = results[strategy, False]
        if result.recipe.kv_cache.sinks.method == "kvsink":
            profile = kvsink_profile(result)
            print(f"\n{strategy}: emergence block {profile.emergence_layer}, channels {profile.channels}, "
                  f"peak {profile.peak / profile.scale:.0f}x a typical token's RMS, offer threshold {profile.threshold:g}")


def quanto_settings(cache) -> str:
    layer = cache.layers[0]
    return (f"nbits {layer.nbits}, axis_key {layer.axis_key}, axis_value {layer.axis_value}, "
            f"q_group_size {layer.q_group_size}, residual_length {layer.residual_length}")


def baseline_table(name: str, result, segments: torch.Tensor, chunk_size: int) -> None:
    """transformers' QuantizedCache and SinkQuantizedCache without sinks, at the same settings:
    residual_length 0 for both, so that with chunks of `chunk_size` >= it transformers flushes its
    buffer at every chunk and neither keeps an exact window (quantsink.kv.backends)."""
    print(f"\n## {name}: transformers' QuantizedCache (quanto) vs quantsink without sinks, matched, chunks of {chunk_size}")
    print("| bits | keys | transformers QuantizedCache settings | perplexity | KL | quantsink settings | perplexity | KL |")
    print("| ---: | --- | --- | ---: | ---: | --- | ---: | ---: |")
    for granularity in QUANTO_KEYS:
        for bits in QUANTO_BITS:
            row = []
            for backend in ("transformers-quanto", "quantsink"):
                config = with_kv(result.recipe, backend=backend, bits=bits, keys=KEYS[granularity], residual_length=0,
                                 sinks={"method": "none"}).kv_cache
                cache = build_kv_cache(config, result.adapter)
                comparison = compare_kv_caches(result.model, segments, cache, chunk_size=chunk_size)
                settings = quanto_settings(cache) if backend == "transformers-quanto" else config.describe()
                row += [settings, f"{comparison.perplexity_quantized:.2f}", f"{comparison.kl_mean:.4f}"]
            print(f"| {bits} | {granularity} | " + " | ".join(row) + " |")


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
    with a profile naming one channel at block 1 by hand (timing only: nothing is predicted right)."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    adapter = resolve(model)
    profile = SinkProfile(emergence_layer=1, channels=[1415], threshold=100.0, scale=1.0, peak=1000.0, layer_ratios=[1.0] * layers)
    return adapter, profile


def decode_latency(adapter, profile: SinkProfile, prompt_length: int, steps: int, bits: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step (generate with `steps` new tokens minus generate with one, over
    steps - 1), per-token keys and values in groups of 64 channels and residual_length 128 for
    both quantized caches (quantsink: the last 128 tokens exact; transformers: a buffer of up to
    127, flushed into the quantized part when full)."""
    model = adapter.model
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_length))
    install(adapter, profile)
    base = Recipe.from_yaml(RECIPE)
    same = dict(bits=bits, residual_length=128, group_size=64, keys=KEYS["per_token"])
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


def overhead_table(name: str, adapter, profile, segments, wide, wide_profile, args) -> None:
    print(f"\n## KVSink prediction overhead at prefill ({args.threads} threads, median of {args.repeats})")
    print("| model | prompt | prefill, 2-bit kvsink-5 | prefill, 2-bit pfn-5 | ratio | predictor alone | share |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, model_adapter, model_profile, ids in (
        (name, adapter, profile, segments[:8]),
        ("Llama 1B width (hidden 2048, 4 layers, random)", wide, wide_profile, torch.randint(0, 32000, (1, 512))),
    ):
        measured = prediction_overhead(model_adapter, model_profile, ids, args.repeats)
        print(f"| {label} | {ids.shape[0]} x {ids.shape[1]} | {measured['kvsink'] * 1e3:.1f} ms | {measured['pfn-5'] * 1e3:.1f} ms | "
              f"{measured['kvsink'] / measured['pfn-5']:.3f}x | {measured['predictor'] * 1e3:.3f} ms | "
              f"{measured['predictor'] / measured['kvsink']:.2%} |")


def decode_table(wide, wide_profile, args) -> None:
    print(f"\n## decode step latency, Llama 1B width (4 layers, random), prompt 512, 64 new tokens, batch 1, {args.threads} threads")
    print("| cache | ms per decode step | vs DynamicCache |")
    print("| --- | ---: | ---: |")
    for bits in QUANTO_BITS:  # each bit width against its own DynamicCache run, so drifting load hits both alike
        latency = decode_latency(wide, wide_profile, 512, 64, bits, args.repeats)
        base = latency["DynamicCache (fp)"]
        for name, seconds in latency.items():
            print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=90, help="held-out segments per model")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Recipe.from_yaml(RECIPE)

    timed_model = None
    for model in MODELS:
        with tempfile.TemporaryDirectory() as scratch:
            results = quantized(model.save(Path(scratch) / "model"), base)
        segments = model.heldout(results["none", False].adapter.processor)[: args.segments]
        if "perplexity" in args.parts:
            perplexity_table(model.name, results, segments, args.chunk_size)
        if "baseline" in args.parts:
            baseline_table(model.name, results["none", False], segments, args.chunk_size)
        if timed_model is None:
            kvsink = results["kvsink-5 top-k", False]
            timed_model = (model.name, kvsink.adapter, kvsink_profile(kvsink), segments)
    if {"overhead", "decode"} & set(args.parts):
        wide, wide_profile = wide_llama()
        if "overhead" in args.parts:
            overhead_table(*timed_model, wide, wide_profile, args)
        if "decode" in args.parts:
            decode_table(wide, wide_profile, args)


if __name__ == "__main__":
    main()
