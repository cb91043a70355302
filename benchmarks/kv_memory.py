"""What the KV cache really holds, and what a decoding step costs, at Llama-3.2-1B width (hidden
2048, intermediate 8192, 32 heads, 8 KV heads of 64, 4 layers, random weights, fp16) with one
4,096-token prompt: DynamicCache, transformers' QuantizedCache (quanto backend, matched: keys per
channel and values per token in groups of 64, residual_length 128) at 2 and 4 bits, and
quantsink's SinkQuantizedCache at 2 and 4 bits (the same groups and window, kvsink-5).

1. bytes: what the cache's tensors hold after prefill and after the timed steps (distinct
   storages, capacity slack and buffers included, quanto's packed tensors opened up), against
   DynamicCache's bytes at the same tokens, and quantsink's accounted packed bytes beside them;
2. decode-step latency: the median of `--steps` single-token steps after prefill, the caches
   stepped in turn in one process on the same prompt and the same next tokens (so drifting load
   hits all alike);
3. peak resident memory: one subprocess per cache kind prefills and decodes `--long-steps`
   tokens; ru_maxrss covers the whole process (prefill activations included), VmHWM is reset
   after prefill so it covers the decode alone.

The kvsink predictor is the real one: quantsink.methods.kvsink profiles it on random token ids
(random weights have no massive activation, so profiling takes the strongest channel it finds
and warns) and installs its hook, which streams every forward call's scores to the cache.

    python benchmarks/kv_memory.py [--quick] [--threads 1] [--vocab 32000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quantsink.kv.attach import build_kv_cache
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme, SinkProfiling
from quantsink.methods.kvsink import install, profile_sinks
from quantsink.models import resolve

KINDS = ("DynamicCache", "QuantizedCache quanto 2-bit", "QuantizedCache quanto 4-bit",
         "SinkQuantizedCache 2-bit kvsink-5", "SinkQuantizedCache 4-bit kvsink-5")
MATCHED = dict(group_size=64, residual_length=128, keys={"granularity": "per_channel"})
LLAMA_3_2_VOCAB = 128256


def wide_llama(vocab: int) -> nn.Module:
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=vocab, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    # built in fp16 directly: an fp32 model cast down would set every process's peak memory
    return LlamaForCausalLM._from_config(config, dtype=torch.float16).eval().requires_grad_(False)


def scheme(kind: str) -> KVCacheScheme:
    bits = 2 if "2-bit" in kind else 4
    if kind.startswith("QuantizedCache"):
        return KVCacheScheme(backend="transformers-quanto", bits=bits, **MATCHED)
    return KVCacheScheme(bits=bits, **MATCHED, sinks={"method": "kvsink", "num_sinks": 5})


def make_cache(kind: str, adapter) -> Any:
    return DynamicCache() if kind == "DynamicCache" else build_kv_cache(scheme(kind), adapter)


def install_predictor(adapter, vocab: int) -> str:
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(1))
    profile = profile_sinks(adapter, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], SinkProfiling(), progress=False)
    install(adapter, profile)
    return f"kvsink predictor profiled by quantsink on random ids: block {profile.emergence_layer}, channels {profile.channels[:2]}"


def tensors_of(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor a cache object holds: attributes, lists and dicts followed, tensor
    subclasses (quanto's packed tensors) opened into their inner tensors, modules skipped."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            for name in value.__tensor_flatten__()[0]:
                yield from tensors_of(getattr(value, name), depth + 1)
        else:
            yield value
    elif depth > 12 or isinstance(value, (nn.Module, str, bytes, int, float)) or value is None:
        return
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item, depth + 1)
    elif hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in ("quantsink", "transformers", "optimum"):
        yield from tensors_of(vars(value), depth + 1)


def held_bytes(cache: Any) -> int:
    storages = {}
    for tensor in tensors_of(cache):
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def snapshot(cache: Any) -> dict[str, Any]:
    entry = {"measured": held_bytes(cache)}
    if isinstance(cache, SinkQuantizedCache):
        memory = cache.memory()
        entry.update(accounted=memory.total, own_measure=memory.measured, tokens=memory.tokens)
    return entry


def prompt_and_steps(args, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return (torch.randint(0, vocab, (1, args.prompt), generator=generator),
            torch.randint(0, vocab, (1, max(args.steps, args.long_steps)), generator=generator))


def prefill(model, ids: torch.Tensor, cache) -> None:
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)


def step(model, token: torch.Tensor, cache) -> None:
    model(token, past_key_values=cache, use_cache=True)


@torch.no_grad()
def latency_run(args) -> dict[str, Any]:
    model = wide_llama(args.vocab)
    adapter = resolve(model)
    note = install_predictor(adapter, args.vocab)
    ids, tokens = prompt_and_steps(args, args.vocab)
    caches, results = {}, {}
    for kind in KINDS:
        caches[kind] = make_cache(kind, adapter)
        started = time.perf_counter()
        prefill(model, ids, caches[kind])
        results[kind] = {"prefill_s": time.perf_counter() - started, "after_prefill": snapshot(caches[kind]), "steps": []}
    load = os.getloadavg()[0]
    for index in range(args.steps):
        token = tokens[:, index : index + 1]
        for kind in KINDS:  # in turn: drifting load hits every cache alike
            started = time.perf_counter()
            step(model, token, caches[kind])
            results[kind]["steps"].append(time.perf_counter() - started)
    for kind in KINDS:
        results[kind]["after_steps"] = snapshot(caches[kind])
        results[kind]["step_ms"] = statistics.median(results[kind]["steps"][1:]) * 1e3  # the first step warms up
        if isinstance(caches[kind], SinkQuantizedCache):
            results[kind]["sinks"] = caches[kind].rows.sink_positions.tolist()
    return {"note": note, "results": results, "load": load}


def peak_memory_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


@torch.no_grad()
def memory_run(args, kind: str) -> dict[str, Any]:
    model = wide_llama(args.vocab)
    adapter = resolve(model)
    if kind.startswith("SinkQuantizedCache"):
        install_predictor(adapter, args.vocab)
    ids, tokens = prompt_and_steps(args, args.vocab)
    cache = make_cache(kind, adapter)
    prefill(model, ids, cache)
    after_prefill_kb = peak_memory_hwm_kb()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: what follows is the decode's peak
    for index in range(args.long_steps):
        step(model, tokens[:, index : index + 1], cache)
    return {"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "decode_hwm_kb": peak_memory_hwm_kb(),
            "prefill_hwm_kb": after_prefill_kb, "bytes": snapshot(cache)["measured"]}


def mib(count: float) -> str:
    return f"{count / 2**20:.2f} MiB"


def report(args, timing: dict[str, Any], peaks: dict[str, dict[str, Any]]) -> None:
    results = timing["results"]
    dynamic = results["DynamicCache"]
    print(f"# KV cache memory and decode speed: Llama-3.2-1B width (hidden 2048, 8 KV heads of 64), 4 layers, random "
          f"fp16 weights, vocab {args.vocab}; prompt {args.prompt} tokens, batch 1; {args.threads} thread(s), "
          f"load average {timing['load']:.1f} at the start of the timed steps")
    print(f"quantsink caches: {timing['note']}; sinks chosen: "
          f"{results['SinkQuantizedCache 2-bit kvsink-5']['sinks']}")
    print("quantized caches: keys per channel and values per token in groups of 64, residual_length 128 "
          "(transformers: a buffer of up to 127 exact tokens, flushed when full)\n")
    for moment, label in (("after_prefill", f"after prefill ({args.prompt} tokens)"),
                          ("after_steps", f"after {args.steps} decode steps")):
        print(f"## bytes held {label}")
        print("| cache | measured (tensors held) | vs DynamicCache | accounted (packed) | measured / accounted |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for kind in KINDS:
            entry = results[kind][moment]
            accounted = entry.get("accounted")
            agreement = f"{entry['measured'] / accounted:.3f}" if accounted else "-"
            print(f"| {kind} | {mib(entry['measured'])} | {entry['measured'] / dynamic[moment]['measured']:.3f}x | "
                  f"{mib(accounted) if accounted else '-'} | {agreement} |")
        print()
    print(f"## decode step latency (median of {args.steps - 1} steps after prefill and one warm-up, the caches in turn)")
    print("| cache | prefill | ms per decode step | vs DynamicCache | vs QuantizedCache at the same bits |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in KINDS:
        entry = results[kind]
        same = ""
        if kind.startswith("SinkQuantizedCache"):
            bits = "2-bit" if "2-bit" in kind else "4-bit"
            same = f"{entry['step_ms'] / results[f'QuantizedCache quanto {bits}']['step_ms']:.2f}x"
        print(f"| {kind} | {entry['prefill_s']:.1f} s | {entry['step_ms']:.1f} | {entry['step_ms'] / dynamic['step_ms']:.2f}x | {same} |")
    print(f"\n## process peak resident memory, one process per cache ({args.long_steps} decode steps after the prompt)")
    print("| cache | ru_maxrss (whole run) | peak during decode (VmHWM reset after prefill) | cache bytes at the end |")
    print("| --- | ---: | ---: | ---: |")
    for kind in KINDS:
        peak = peaks[kind]
        print(f"| {kind} | {peak['ru_maxrss_kb'] / 1024:.0f} MiB | {peak['decode_hwm_kb'] / 1024:.0f} MiB | {mib(peak['bytes'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=33, help="timed decode steps (the first is a warm-up)")
    parser.add_argument("--long-steps", type=int, default=256, help="decode steps of each peak-memory process")
    parser.add_argument("--vocab", type=int, default=32000,
                        help=f"vocabulary (Llama-3.2 has {LLAMA_3_2_VOCAB}; a smaller one keeps the LM head from hiding the cache)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 512-token prompt, 5 steps, 16 long steps")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompt, args.steps, args.long_steps = 512, 5, 16
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_run(args, args.child)))
        return
    timing = latency_run(args)
    peaks = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--child", kind, "--prompt", str(args.prompt), "--long-steps", str(args.long_steps),
                   "--vocab", str(args.vocab), "--threads", str(args.threads), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[kind] = json.loads(output.strip().splitlines()[-1])
    report(args, timing, peaks)


if __name__ == "__main__":
    main()
