"""Fidelity of the real all-MiniLM-L6-v2 under several quantization settings, quantsink's and
llm-compressor's side by side in one run, and the int8 backend's latency with and without
sink-tokens and SmoothQuant.

    python benchmarks/minilm_fidelity.py [--samples 128] [--holdout 256] [--seq-len 128] [--rounds 5]
        [--llmcompressor-venv benchmarks/.venv-llmcompressor | --no-llmcompressor]

Each row quantizes a fresh copy of the model on the same bundled calibration paragraphs and
measures cosine similarity of the mean-pooled embedding to full precision on the same disjoint
holdout paragraphs (the split quantsink's report makes). quantsink's rows per bit width: naive
per-tensor static (symmetric and asymmetric), sink-tokens, SmoothQuant, SmoothQuant then
sink-tokens, and per-token dynamic (the ceiling static scales aim at).

llm-compressor cannot share a venv with quantsink's pins (benchmarks/requirements-llmcompressor.txt
says why), so its rows run in a sidecar venv, built on first use from that file, through
benchmarks/llmcompressor_worker.py in a subprocess. This process hands it the calibration
paragraphs as token ids and the holdout batches as quantsink feeds them (a JSON file), and
measures the embeddings it returns against this process's own full-precision ones, with the
same metric; the worker's full-precision embeddings come back too, as a check that both venvs
run the same model."""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

import quantsink
from quantsink.evaluate import embed_batches, fidelity
from quantsink.models import resolve
from quantsink.models.catalog import CATALOG
from quantsink.pipeline import Splits, data
from quantsink.recipe import CalibrationConfig

HERE = Path(__file__).resolve().parent
SIDECAR_REQUIREMENTS = HERE / "requirements-llmcompressor.txt"
WORKER = HERE / "llmcompressor_worker.py"

SINK = {"sink-tokens": {}}
# alpha 0.8: at SmoothQuant's usual 0.5 the [CLS] channel of each output.dense input, whose
# weight column is the largest of the layer, keeps most of its range while every other channel
# shrinks, and W8A8 falls to 0.885 (README, sink-tokens section)
SMOOTHQUANT = {"smoothquant": {"alpha": 0.8}}
# after alpha 0.8 smoothing [CLS] stands 3.9x over the median token at most: sink-tokens' 5x finds nothing
SINK_AFTER_SMOOTHING = {"sink-tokens": {"outlier_ratio": 3.0}}
BITS = ((8, 8), (8, 6), (6, 6))


def setting(weights: int, inputs: int, symmetric: bool = True, dynamic: bool = False) -> dict[str, Any]:
    activations: dict[str, Any] = {"bits": inputs, "symmetric": symmetric}
    if dynamic:
        activations.update(granularity="per_token", dynamic=True)
    return {"weights": {"bits": weights}, "activations": activations}


# label -> (quantization, methods)
ROWS: dict[str, tuple[dict[str, Any], list]] = {}
for _w, _a in BITS:
    _bits = f"W{_w}A{_a}"
    ROWS[f"{_bits} quantsink naive"] = (setting(_w, _a), [])
    ROWS[f"{_bits} quantsink naive asym"] = (setting(_w, _a, symmetric=False), [])
    ROWS[f"{_bits} quantsink sink-tokens"] = (setting(_w, _a), [SINK])
    ROWS[f"{_bits} quantsink asym + sink-tokens"] = (setting(_w, _a, symmetric=False), [SINK])
    ROWS[f"{_bits} quantsink SmoothQuant"] = (setting(_w, _a), [SMOOTHQUANT])
    ROWS[f"{_bits} quantsink SmoothQuant + sink-tokens"] = (setting(_w, _a), [SMOOTHQUANT, SINK_AFTER_SMOOTHING])
    ROWS[f"{_bits} quantsink per-token dynamic (ceiling)"] = (setting(_w, _a, dynamic=True), [])
ROWS["W8 quantsink weights only"] = ({"activations": None}, [])


def recipe(args: argparse.Namespace, quantization: dict[str, Any], methods: list, backend: str = "fake") -> dict[str, Any]:
    return {
        "name": "bench",
        "calibration": calibration_settings(args).model_dump(),
        "methods": methods,
        "quantization": {"backend": backend, **quantization},
    }


def calibration_settings(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(num_samples=args.samples, holdout=args.holdout, batch_size=16, seq_len=args.seq_len)


def print_row(label: str, result: dict[str, float]) -> None:
    print(f"{label:64s} {result['cosine_mean']:9.4f} {result['cosine_min']:9.4f} {result['relative_l2']:8.4f}", flush=True)


def fidelity_table(args: argparse.Namespace) -> None:
    print(f"{'setting':64s} {'cos mean':>9s} {'cos min':>9s} {'rel L2':>8s}")
    full = resolve("all-minilm-l6-v2")
    splits = data(full, calibration_settings(args))
    reference = embed_batches(full, splits.holdout)
    for label, (quantization, methods) in ROWS.items():
        result = quantsink.quantize("all-minilm-l6-v2", recipe(args, quantization, methods), progress=False).report["fidelity"]
        print_row(label, result)
    if args.no_llmcompressor:
        return
    python = sidecar_python(Path(args.llmcompressor_venv))
    if python is not None:
        llmcompressor_rows(args, python, splits, reference)


def sidecar_python(venv: Path) -> Optional[Path]:
    """The sidecar venv's python, building the venv from SIDECAR_REQUIREMENTS when it is not
    there; None (and why, with pip's own words) when it cannot be built."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    print(f"building the llm-compressor sidecar venv {venv} (pip install -r {SIDECAR_REQUIREMENTS.name})", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "-r", str(SIDECAR_REQUIREMENTS)]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()[-12:]
            print(f"llm-compressor rows skipped: {' '.join(step[:4])} ... failed:\n  " + "\n  ".join(reason), flush=True)
            return None
    return python


def llmcompressor_rows(args: argparse.Namespace, python: Path, splits: Splits, reference: torch.Tensor) -> None:
    """llm-compressor's rows (benchmarks/llmcompressor_worker.py), on the same paragraphs and
    holdout batches as quantsink's, measured here against the same reference."""
    model_folder = next(entry for entry in CATALOG if entry.name == "all-minilm-l6-v2").local_folder()
    calibration = [ids[mask.bool()].tolist() for batch in splits.calibration
                   for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    with tempfile.TemporaryDirectory(prefix="minilm-llmcompressor-") as folder:
        inputs, output, log = Path(folder) / "inputs.json", Path(folder) / "output.json", Path(folder) / "worker.log"
        inputs.write_text(json.dumps({
            "model": str(model_folder),
            "seq_len": args.seq_len,
            "calibration": calibration,
            "holdout": [{key: batch[key].tolist() for key in ("input_ids", "attention_mask")} for batch in splits.holdout],
            "bits": [list(bits) for bits in BITS],
            "quantsink_source": str(HERE.parent),
        }))
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        with log.open("w") as stream:
            done = subprocess.run([str(python), str(WORKER), str(inputs), str(output)], stdout=stream, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            tail = log.read_text().strip().splitlines()[-15:]
            print(f"llm-compressor rows failed (worker exit {done.returncode}):\n  " + "\n  ".join(tail), flush=True)
            return
        result = json.loads(output.read_text())
        embeddings = load_file(result["embeddings"])
    versions = result["versions"]
    worker_fp32 = fidelity(reference, embeddings["fp32"])
    print(f"llm-compressor {versions['llmcompressor']} (sidecar: torch {versions['torch']}, transformers "
          f"{versions['transformers']}, compressed-tensors {versions['compressed-tensors']}); its fp32 embeddings vs "
          f"this process's: cosine min {worker_fp32['cosine_min']:.6f}")
    for row in result["rows"]:
        print_row(f"{row['bits']} llm-compressor {row['label']}", fidelity(reference, embeddings[row["key"]]))


def latency_table(args: argparse.Namespace) -> None:
    """Interleaved rounds over the same holdout batches: fp32, naive int8, int8 + sink-tokens,
    int8 + SmoothQuant (its run-time multiplies), int8 + both."""
    full = resolve("all-minilm-l6-v2")
    variants = {"int8 W8A8 naive": [], "int8 W8A8 sink-tokens": [SINK], "int8 W8A8 SmoothQuant": [SMOOTHQUANT],
                "int8 W8A8 SmoothQuant + sink-tokens": [SMOOTHQUANT, SINK_AFTER_SMOOTHING]}
    results = {label: quantsink.quantize("all-minilm-l6-v2", recipe(args, setting(8, 8), methods, "int8"), progress=False)
               for label, methods in variants.items()}
    adapters = {"fp32": full, **{label: result.adapter for label, result in results.items()}}
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
          f"over {len(batches)} batches; int8 kernels {results['int8 W8A8 naive'].report.get('int8_kernels')})")
    print(f"{'model':38s} {'ms':>8s} {'vs naive int8':>14s} {'cos mean':>9s}")
    for label, values in times.items():
        median = statistics.median(values)
        cosine = results[label].report["fidelity"]["cosine_mean"] if label in results else 1.0
        print(f"{label:38s} {1000 * median:8.1f} {median / reference:13.3f}x {cosine:9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="holdout batches timed per round")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--llmcompressor-venv", default=str(HERE / ".venv-llmcompressor"),
                        help="the sidecar venv llm-compressor's rows run in (built here on first use)")
    parser.add_argument("--no-llmcompressor", action="store_true", help="quantsink's rows only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_fidelity:
        fidelity_table(args)
    if not args.skip_latency:
        latency_table(args)


if __name__ == "__main__":
    main()
