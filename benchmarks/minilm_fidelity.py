"""Fidelity of the real all-MiniLM-L6-v2 under several quantization settings, side by side, and
the int8 backend's latency with and without sink-tokens.

    python benchmarks/minilm_fidelity.py [--samples 128] [--holdout 256] [--seq-len 128] [--rounds 5]

Each row quantizes a fresh copy of the model on the same bundled calibration paragraphs and
measures cosine similarity of the mean-pooled embedding to full precision on the same disjoint
holdout paragraphs (the split quantsink's report makes). Rows per bit width: naive per-tensor
static (symmetric, and asymmetric where the backend allows), the same with sink-tokens, and
per-token dynamic (the ceiling static scales aim at). llm-compressor's rows (W8A8, SmoothQuant,
GPTQ; symmetric and asymmetric) run when it is importable: it is not installable beside this
torch (see LLMCOMPRESSOR)."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import statistics
import time
from typing import Any

import torch

import quantsink
from quantsink.data import load_samples
from quantsink.evaluate import embed_batches, fidelity
from quantsink.models import resolve
from quantsink.models.hf import HFBertTextAdapter
from quantsink.pipeline import data
from quantsink.recipe import CalibrationConfig

SINK = [{"sink-tokens": {"protect": "with_outliers"}}]  # the default
FROM_EMERGENCE = [{"sink-tokens": {"protect": "from_emergence"}}]


def setting(weights: int, inputs: int, symmetric: bool = True, dynamic: bool = False) -> dict[str, Any]:
    activations: dict[str, Any] = {"bits": inputs, "symmetric": symmetric}
    if dynamic:
        activations.update(granularity="per_token", dynamic=True)
    return {"weights": {"bits": weights}, "activations": activations}


# label -> (quantization, methods)
ROWS: dict[str, tuple[dict[str, Any], list]] = {}
for _w, _a in ((8, 8), (8, 6), (6, 6)):
    _bits = f"W{_w}A{_a}"
    ROWS[f"{_bits} per-tensor static, naive"] = (setting(_w, _a), [])
    ROWS[f"{_bits} per-tensor static, sink-tokens with_outliers"] = (setting(_w, _a), SINK)
    ROWS[f"{_bits} per-tensor static, sink-tokens from_emergence"] = (setting(_w, _a), FROM_EMERGENCE)
    ROWS[f"{_bits} per-tensor static asym, naive"] = (setting(_w, _a, symmetric=False), [])
    ROWS[f"{_bits} per-tensor static asym, sink-tokens with_outliers"] = (setting(_w, _a, symmetric=False), SINK)
    ROWS[f"{_bits} per-token dynamic (ceiling)"] = (setting(_w, _a, dynamic=True), [])
ROWS["W8A8 per-tensor static mse, naive"] = ({"activations": {"observer": "mse"}}, [])
ROWS["W8 weights only"] = ({"activations": None}, [])

# what pip says when asked for llm-compressor beside quantsink's pins (pip install llmcompressor
# "torch==2.14.1"): the releases that support transformers 5 cap torch below it, so it cannot be
# an extra of quantsink. Its rows run where it was installed by hand, in a throwaway venv beside
# quantsink's packages: pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0,
# then pip install datasets accelerate "auto-round<=0.15.1" nvidia-ml-py requests loguru.
LLMCOMPRESSOR = ("llmcompressor 0.14.0.1 depends on torch<=2.14.0 and >=2.10.0 (and transformers<=5.17.0, "
                 "compressed-tensors==0.19.0); quantsink pins torch 2.14.1, transformers 5.23.0, compressed-tensors 0.20.1")
# post-LN BERT has one function-preserving smoothing pair (llm-compressor has no BertModel mapping,
# and falls back to Llama names, smoothing nothing)
BERT_SMOOTHQUANT = [[["re:.*attention.output.dense$"], "re:.*attention.self.value$"]]


def recipe(args: argparse.Namespace, quantization: dict[str, Any], methods: list, backend: str = "fake") -> dict[str, Any]:
    return {
        "name": "bench",
        "calibration": calibration_settings(args).model_dump(),
        "methods": methods,
        "quantization": {"backend": backend, **quantization},
    }


def fidelity_table(args: argparse.Namespace) -> None:
    print(f"{'setting':54s} {'cos mean':>9s} {'cos min':>9s} {'rel L2':>8s}")
    for label, (quantization, methods) in ROWS.items():
        fidelity = quantsink.quantize("all-minilm-l6-v2", recipe(args, quantization, methods), progress=False).report["fidelity"]
        print(f"{label:54s} {fidelity['cosine_mean']:9.4f} {fidelity['cosine_min']:9.4f} {fidelity['relative_l2']:8.4f}", flush=True)
    if importlib.util.find_spec("llmcompressor") is None:
        print(f"{'llm-compressor W8A8 / SmoothQuant / GPTQ':54s} {'not installable here':>28s}\n  ({LLMCOMPRESSOR})")
    else:
        llmcompressor_rows(args)


def llmcompressor_rows(args: argparse.Namespace) -> None:
    """llm-compressor's oneshot on the same calibration paragraphs (per-tensor static inputs, its
    default min-max observer), measured on the same holdout as every quantsink row."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    full = resolve("all-minilm-l6-v2")
    settings = calibration_settings(args)
    splits = data(full, settings)
    reference = embed_batches(full, splits.holdout)
    texts = load_samples(settings.data, "text", settings.num_samples, settings.holdout, settings.seed, settings.seq_len).calibration
    tokens = full.tokenizer(list(texts), truncation=True, max_length=args.seq_len)
    dataset = Dataset.from_dict({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})

    def scheme(weights: int, inputs: int, symmetric: bool = True) -> dict[str, Any]:
        return {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": weights, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": inputs, "type": "int", "symmetric": symmetric, "strategy": "tensor", "dynamic": False},
        }}

    for weights, inputs in ((8, 8), (8, 6), (6, 6)):
        rows = {
            "static": [QuantizationModifier(config_groups=scheme(weights, inputs))],
            "static asym": [QuantizationModifier(config_groups=scheme(weights, inputs, symmetric=False))],
            "SmoothQuant + static": [SmoothQuantModifier(smoothing_strength=0.8, mappings=BERT_SMOOTHQUANT),
                                     QuantizationModifier(config_groups=scheme(weights, inputs))],
            "GPTQ static": [GPTQModifier(config_groups=scheme(weights, inputs))],
        }
        for label, modifiers in rows.items():
            model = copy.deepcopy(full.model)
            oneshot(model=model, dataset=dataset, recipe=modifiers, num_calibration_samples=args.samples,
                    max_seq_length=args.seq_len, pipeline="basic")
            adapter = HFBertTextAdapter.from_module(model, processor=full.tokenizer)
            result = fidelity(reference, embed_batches(adapter, splits.holdout))
            label = f"llm-compressor {llmcompressor.__version__} W{weights}A{inputs} {label}"
            print(f"{label:54s} {result['cosine_mean']:9.4f} {result['cosine_min']:9.4f} {result['relative_l2']:8.4f}", flush=True)


def calibration_settings(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(num_samples=args.samples, holdout=args.holdout, batch_size=16, seq_len=args.seq_len)


def latency_table(args: argparse.Namespace) -> None:
    """Interleaved rounds over the same holdout batches: fp32, naive int8, int8 + sink-tokens (both
`protect` settings)."""
    full = resolve("all-minilm-l6-v2")
    naive = quantsink.quantize("all-minilm-l6-v2", recipe(args, setting(8, 8), [], "int8"), progress=False)
    outliers = quantsink.quantize("all-minilm-l6-v2", recipe(args, setting(8, 8), SINK, "int8"), progress=False)
    every = quantsink.quantize("all-minilm-l6-v2", recipe(args, setting(8, 8), FROM_EMERGENCE, "int8"), progress=False)
    adapters = {"fp32": full, "int8 W8A8 naive": naive.adapter, "int8 W8A8 sink-tokens with_outliers": outliers.adapter,
                "int8 W8A8 sink-tokens from_emergence": every.adapter}
    batches = data(full, calibration_settings(args)).holdout[: args.batches]
    times: dict[str, list[float]] = {label: [] for label in adapters}
    for _ in range(args.rounds):
        for label, adapter in adapters.items():
            started = time.perf_counter()
            for inputs in batches:
                adapter.embed(inputs)
            times[label].append((time.perf_counter() - started) / len(batches))
    reference = statistics.median(times["int8 W8A8 naive"])
    print(f"\nlatency per batch of 16 x <= {args.seq_len} tokens ({torch.get_num_threads()} threads, median of {args.rounds} rounds "
          f"over {len(batches)} batches; int8 kernels {naive.report.get('int8_kernels')})")
    print(f"{'model':38s} {'ms':>8s} {'vs naive int8':>14s}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:38s} {1000 * median:8.1f} {median / reference:13.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="holdout batches timed per round")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--only-llmcompressor", action="store_true", help="its rows alone (no quantsink rows, no latency)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only_llmcompressor:
        llmcompressor_rows(args)
        return
    if not args.skip_fidelity:
        fidelity_table(args)
    latency_table(args)


if __name__ == "__main__":
    main()
