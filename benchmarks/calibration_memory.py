"""Peak memory (RSS) and time of calibrating, in-memory against sequential (issue 15), with the
same samples and the same recipe apart from its `execution` section, in one run:

1. a ViT-L/14-size vision encoder (transformers CLIPVisionModel with CLIP ViT-L/14's vision
   config: hidden 1024, 24 layers, 16 heads, intermediate 4096, patch 14, image 224; random
   seeded fp32 weights, ~1.2 GB), saved as a Hugging Face folder with its CLIPImageProcessor;
   64 bundled calibration images in batches of 8, holdout 8;
2. a ~1B-parameter Llama (Llama-3.2-1B's config: hidden 2048, 16 layers, 32 heads, 8 KV heads,
   intermediate 8192, vocab 128256, tied embeddings; random seeded fp32 weights, ~5 GB) with the
   planted Llama's word-level tokenizer (quantsink.testing.planted_llm.build_tokenizer, as
   build_tiny_causal_lm uses it); 16 bundled text segments of 128 tokens in batches of 4,
   holdout 4;
3. 1 against 2 processes (torchrun, gloo) on the ViT-L model, in_memory.

W8A8 with the int8 backend and int8 export (per-channel weights, per-tensor static activations,
minmax; targets Linear). Modes: in_memory; sequential (block inputs in memory, weights
resident); sequential + offload_dir (block inputs and weights on disk, each block quantized at
the end of its pass). Each measurement is a fresh process running `quantsink.quantize(FOLDER,
recipe)` and `.save(OUT)`; its ru_maxrss is read when `pipeline.calibrate` returns (before
`make_resident` brings streamed blocks back: the calibration's peak) and after the export (the
whole run's peak). The parent compares the OUT folders' model.safetensors tensor by tensor
(sha256 of each tensor's bytes) and prints each run's holdout cosine. After calibrate the
high-water mark is reset (/proc/self/clear_refs) after each later stage (make_resident, quantize,
evaluate, export), so the tables also say which stage sets the whole run's peak (the largest).

Each child fixes glibc's mmap threshold first, as `quantsink` (the CLI) does for its own process
(quantsink.memory.keep_large_allocations_mapped).

4. (vit-allocator) the ViT-L runs again with glibc's own dynamic threshold (what an application
   calling the API gets unless it fixes the threshold): what of each peak is heap fragmentation.

`--repeats N` runs every ViT-L row N times (fresh processes): the tables give the first run and the
range over the N; the acceptance ratio divides sequential + offload_dir's highest calibration peak
by in_memory's lowest.

The torchrun rows launch this script's child (which calls quantsink.quantize and .save, as
`python -m quantsink quantize` does) under `python -m torch.distributed.run --nproc-per-node 2
--standalone`, so that each rank reports its own peak.

    OMP_NUM_THREADS=1 python benchmarks/calibration_memory.py [--threads 1]
        [--parts vit llama torchrun vit-allocator] [--repeats N] [--quick] [--workdir DIR]
        [--output benchmarks/results/calibration_memory.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("in_memory", "sequential", "sequential + offload_dir")
PARTS = ("vit", "llama", "torchrun", "vit-allocator")
ALLOCATORS = ("fixed", "dynamic")  # glibc's mmap threshold: fixed as the CLI does, or glibc's own

# the sizes of the models; --quick shrinks them for a smoke run of the script itself
VIT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
           patch_size=14, projection_dim=768, hidden_act="quick_gelu")
LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
QUICK_VIT = dict(VIT, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
QUICK_LLAMA = dict(LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=4096)

CALIBRATION = {
    "vit": {"data": "bundled", "num_samples": 64, "batch_size": 8, "holdout": 8, "seed": 0},
    "llama": {"data": "bundled", "num_samples": 16, "batch_size": 4, "holdout": 4, "seed": 0, "seq_len": 128},
}
QUANTIZATION = {
    "backend": "int8",
    "weights": {"bits": 8, "granularity": "per_channel", "symmetric": True, "observer": "minmax"},
    "activations": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "symmetric": True, "observer": "minmax"},
    "targets": ["Linear"],
    "ignore": [],
}


def recipe(model: str, mode: str, offload_dir: Path) -> dict[str, Any]:
    """The one recipe of `model`'s runs; only `execution` differs between modes."""
    execution = {"in_memory": {"pipeline": "in_memory"}, "sequential": {"pipeline": "sequential"},
                 "sequential + offload_dir": {"pipeline": "sequential", "offload_dir": str(offload_dir)}}[mode]
    return {"name": f"calibration-memory-{model}", "calibration": CALIBRATION[model], "execution": execution,
            "quantization": QUANTIZATION, "export": {"format": "int8"}}


# --- children ------------------------------------------------------------------------------
def build(model: str, folder: Path, quick: bool) -> dict[str, Any]:
    """Save the random-weight model as a Hugging Face folder (in a child: the parent stays small)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if model == "vit":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**(QUICK_VIT if quick else VIT))
        network = CLIPVisionModel(config).eval()
        size = config.image_size
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from quantsink.testing.planted_llm import build_tokenizer  # the tokenizer build_tiny_causal_lm uses

        tokenizer = build_tokenizer()
        config = LlamaConfig(**(QUICK_LLAMA if quick else LLAMA), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id)
        network = LlamaForCausalLM._from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
        tokenizer.save_pretrained(folder)
    network.save_pretrained(folder)
    parameters = sum(p.numel() for p in network.parameters())  # tied weights counted once
    return {"parameters": parameters, "bytes_on_disk": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def proc_status() -> dict[str, float]:
    """VmHWM (the high-water mark that ru_maxrss reports), VmRSS and its anonymous and
    file-backed parts (a memory-mapped checkpoint's pages count in RSS once touched), in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(line.split()[1]) / 1024
    return values


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (and so ru_maxrss) back to the current RSS


def tensor_hashes(out: Path) -> dict[str, str]:
    import hashlib

    import torch
    from safetensors import safe_open

    hashes = {}
    with safe_open(str(out / "model.safetensors"), framework="pt") as opened:
        for key in sorted(opened.keys()):
            tensor = opened.get_tensor(key).contiguous()
            digest = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy())
            hashes[key] = f"{tensor.dtype}:{tuple(tensor.shape)}:{digest.hexdigest()}"
    return hashes


def measure(folder: Path, recipe_json: str, out: Path, threads: int, allocator: str) -> dict[str, Any]:
    """One quantize run; the peaks when calibrate returns and after the export."""
    from quantsink import memory

    if allocator == "fixed":
        memory.keep_large_allocations_mapped()
    import torch

    torch.set_num_threads(threads)
    import quantsink
    from quantsink import distributed, pipeline

    # what every process holds before any model loads (torch, transformers, quantsink)
    marks: dict[str, Any] = {"stages": {}, "import_floor_mb": proc_status()["VmRSS"]}
    real = {name: getattr(pipeline, name) for name in ("data", "calibrate", "make_resident", "quantize", "evaluate", "export")}

    def data(*args, **kwargs):  # called right after load: the model is in memory (or its blocks on disk)
        marks["loaded_peak_mb"] = proc_status()["VmHWM"]
        return real["data"](*args, **kwargs)

    def calibrate(*args, **kwargs):
        started = time.perf_counter()
        result = real["calibrate"](*args, **kwargs)
        marks["calibrate_s"] = time.perf_counter() - started
        status = proc_status()  # before make_resident: the high-water mark since the process started
        marks.update(calibration_peak_mb=status["VmHWM"], calibration_anon_mb=status["RssAnon"],
                     calibration_file_mb=status["RssFile"])
        marks["stages"]["load + data + reference + calibrate"] = status["VmHWM"]
        reset_peak()  # each later stage's own peak; the whole run's is the largest of them
        return result

    def staged(name: str, label: str):
        def call(*args, **kwargs):
            result = real[name](*args, **kwargs)
            if name != "make_resident" or label not in marks["stages"]:  # run calls it twice, the second a no-op
                marks["stages"][label] = proc_status()["VmHWM"]
                reset_peak()
            return result
        return call

    pipeline.data, pipeline.calibrate = data, calibrate
    pipeline.make_resident = staged("make_resident", "make_resident")
    pipeline.quantize = staged("quantize", "quantize (freeze + probe)")
    pipeline.evaluate = staged("evaluate", "evaluate")
    pipeline.export = staged("export", "export")
    started = time.perf_counter()
    result = quantsink.quantize(str(folder), json.loads(recipe_json), progress=False)
    result.save(out)
    whole_s = time.perf_counter() - started
    marks["stages"]["export"] = max(marks["stages"].get("export", 0), proc_status()["VmHWM"])
    entry = {**marks, "whole_peak_mb": max(marks["stages"].values()), "whole_s": whole_s, "rank": distributed.rank(),
             "world_size": distributed.world_size(), "pass_s": result.report["calibration"].get("seconds")}
    if distributed.is_main():
        entry["cosine"] = result.report.get("fidelity", {}).get("cosine_mean")
        entry["hashes"] = tensor_hashes(out)
    return entry


# --- parent --------------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def last_json(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_child(arguments: list[str], threads: int, launcher: list[str] | None = None,
              allocator: str = "fixed") -> tuple[list[dict[str, Any]], float]:
    command = [*(launcher or [sys.executable]), __file__, *arguments, "--threads", str(threads), "--allocator", allocator]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=child_env(threads), cwd=ROOT)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise SystemExit(f"child failed ({completed.returncode}): {' '.join(command)}")
    return last_json(completed.stdout), wall


def compare(reference: dict[str, str], other: dict[str, str]) -> str:
    if reference.keys() != other.keys():
        return f"different tensors ({len(reference.keys() ^ other.keys())} names in one only)"
    differing = [key for key in reference if reference[key] != other[key]]
    if not differing:
        return f"identical ({len(reference)} tensors)"
    return f"{len(differing)} of {len(reference)} tensors differ, e.g. {', '.join(differing[:3])}"


def machine(threads: int) -> str:
    import torch
    import transformers

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = sorted(flag for flag in flags if flag == "avx2" or flag.startswith(("avx512", "amx")))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{model}, {os.cpu_count()} cores; flags {' '.join(shown) or 'none of avx2/avx512/amx'}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}; {threads} thread(s) per process; "
            f"load average {os.getloadavg()[0]:.1f} at the start")


def peak_range(runs: list[dict[str, Any]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{min(values):.0f}-{max(values):.0f}"


def above_floor(run: dict[str, Any]) -> float:
    return run["calibration_peak_mb"] - run["import_floor_mb"]


def mode_table(model: str, repeated: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = {mode: runs[0] for mode, runs in repeated.items()}
    base = rows["in_memory"]
    count = len(repeated["in_memory"])
    lines = ["| mode | import floor (MB) | peak RSS after loading (MB) | calibration peak RSS (MB) | whole-run peak RSS (MB) | "
             "calibration s | whole-run s | calibration peak / in_memory | calibration peak above the floor / in_memory's | "
             "whole-run peak / in_memory | holdout cosine |"
             + (f" calibration peak over {count} runs (MB) | calibration s over {count} runs |" if count > 1 else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if count > 1 else "")]
    for mode in MODES:
        row = rows[mode]
        lines.append(f"| {mode} | {row['import_floor_mb']:.0f} | {row['loaded_peak_mb']:.0f} | {row['calibration_peak_mb']:.0f} | "
                     f"{row['whole_peak_mb']:.0f} | {row['calibrate_s']:.1f} | {row['whole_s']:.1f} | "
                     f"{row['calibration_peak_mb'] / base['calibration_peak_mb']:.2f} | "
                     f"{above_floor(row) / above_floor(base):.2f} | "
                     f"{row['whole_peak_mb'] / base['whole_peak_mb']:.2f} | {row['cosine']:.6f} |"
                     + (f" {peak_range(repeated[mode], 'calibration_peak_mb')} | {peak_range(repeated[mode], 'calibrate_s')} |"
                        if count > 1 else ""))
    stages = list(rows["in_memory"]["stages"])
    lines += ["", "Where the peak is reached: each stage's own peak RSS (MB; VmHWM reset after each, the whole-run peak is the "
              "largest), and what RSS held when calibrate returned, anonymous + file-backed (the memory-mapped checkpoint's "
              "touched pages and the libraries count in RSS):", "",
              "| mode | anonymous + file-backed RSS when calibrate returns (MB) | " + " | ".join(stages) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in stages) + " |"]
    for mode in MODES:
        row = rows[mode]
        lines.append(f"| {mode} | {row['calibration_anon_mb']:.0f} + {row['calibration_file_mb']:.0f} | "
                     + " | ".join(f"{row['stages'].get(stage, float('nan')):.0f}" for stage in stages) + " |")
    lines.append("")
    for mode in MODES[1:]:
        lines.append(f"- OUT model.safetensors, {mode} against in_memory: {compare(base['hashes'], rows[mode]['hashes'])}")
    repeats = [run for runs in repeated.values() for run in runs[1:]]
    if repeats:
        same = all(compare(base["hashes"], run["hashes"]) == compare(base["hashes"], base["hashes"]) for run in repeats)
        lines.append(f"- OUT model.safetensors of the {len(repeats)} repeated runs against the first in_memory: "
                     f"{'identical' if same else 'DIFFERENT'}")
    return lines


def acceptance(repeated: dict[str, list[dict[str, Any]]]) -> str:
    """Sequential + offload_dir's highest calibration peak over in_memory's lowest."""
    highest = max(run["calibration_peak_mb"] for run in repeated["sequential + offload_dir"])
    lowest = min(run["calibration_peak_mb"] for run in repeated["in_memory"])
    ratio = highest / lowest
    floor_ratio = (max(above_floor(run) for run in repeated["sequential + offload_dir"])
                   / min(above_floor(run) for run in repeated["in_memory"]))
    return (f"{'met' if ratio <= 0.5 else 'NOT met'}, {ratio:.2f}x ({highest:.0f} MB, sequential + offload_dir's highest, "
            f"/ {lowest:.0f} MB, in_memory's lowest); above each process's import floor {floor_ratio:.2f}x")


def run_modes(model: str, folder: Path, work: Path, threads: int, allocator: str = "fixed",
              repeats: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Every mode `repeats` times, interleaved (mode after mode, then again), each a fresh process."""
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        for index, mode in enumerate(MODES):
            out, offload = work / f"out-{model}-{index}", work / f"offload-{model}-{index}"
            [entry], wall = run_child(["--child", str(folder), json.dumps(recipe(model, mode, offload)), str(out)], threads,
                                      allocator=allocator)
            entry["process_s"] = wall
            entry["offload_left"] = sorted(p.name for p in offload.rglob("*")) if offload.exists() else []
            rows[mode].append(entry)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(offload, ignore_errors=True)
            print(f"  {model} {mode} ({allocator} mmap threshold, run {repeat + 1}): calibration peak "
                  f"{entry['calibration_peak_mb']:.0f} MB, {entry['whole_s']:.0f} s", file=sys.stderr, flush=True)
    return rows


def run_torchrun(folder: Path, work: Path, threads: int, reference: dict[str, Any], allocator: str = "fixed") -> list[str]:
    out = work / "out-vit-torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    entries, wall = run_child(["--child", str(folder), json.dumps(recipe("vit", "in_memory", work / "unused")), str(out)],
                              threads, launcher, allocator)
    shutil.rmtree(out, ignore_errors=True)
    entries.sort(key=lambda entry: entry["rank"])
    main_rank = next(entry for entry in entries if entry["rank"] == 0)
    lines = ["| processes | rank | calibration peak RSS (MB) | whole-run peak RSS (MB) | calibration s | whole-run s | "
             "process wall s (launcher included) | holdout cosine |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| 1 | 0 | {reference['calibration_peak_mb']:.0f} | {reference['whole_peak_mb']:.0f} | {reference['calibrate_s']:.1f} | "
             f"{reference['whole_s']:.1f} | {reference['process_s']:.1f} | {reference['cosine']:.6f} |"]
    for entry in entries:
        cosine = f"{entry['cosine']:.6f}" if entry.get("cosine") is not None else "(rank 0 evaluates)"
        lines.append(f"| 2 | {entry['rank']} | {entry['calibration_peak_mb']:.0f} | {entry['whole_peak_mb']:.0f} | "
                     f"{entry['calibrate_s']:.1f} | {entry['whole_s']:.1f} | {wall:.1f} | {cosine} |")
    stages = list(reference["stages"])
    lines += ["", "| processes | rank | anonymous + file-backed RSS when calibrate returns (MB) | " + " | ".join(stages) + " |",
              "| ---: | ---: | ---: | " + " | ".join("---:" for _ in stages) + " |"]
    for processes, entry in [(1, reference), *((2, entry) for entry in entries)]:
        lines.append(f"| {processes} | {entry['rank']} | {entry['calibration_anon_mb']:.0f} + {entry['calibration_file_mb']:.0f} | "
                     + " | ".join((f"{entry['stages'][stage]:.0f}" if stage in entry["stages"] else "-") for stage in stages) + " |")
    total = sum(entry["whole_peak_mb"] for entry in entries)
    lines += ["", f"- 2 processes: sum of the ranks' whole-run peaks {total:.0f} MB ({total / reference['whole_peak_mb']:.2f}x one "
                  f"process); calibration {main_rank['calibrate_s'] / reference['calibrate_s']:.2f}x, process wall "
                  f"{wall / reference['process_s']:.2f}x one process's",
              f"- OUT model.safetensors, 2 processes against 1: {compare(reference['hashes'], main_rank['hashes'])}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="vit-allocator: the ViT-L modes again with glibc's dynamic mmap threshold")
    parser.add_argument("--repeats", type=int, default=1, help="run every ViT-L row this many times")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="fixed", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run of the script")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model folders and OUTs go (a temp dir)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables there")
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(args.build[0], Path(args.build[1]), args.quick)))
        return
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], Path(args.child[2]), args.threads, args.allocator)),
              flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="calibration-memory-", dir=args.workdir))
    lines = [f"# Calibration memory and time (issue 15){' (--quick: small models)' if args.quick else ''}",
             f"machine: {machine(args.threads)}",
             "recipe: W8A8 int8 backend, int8 export (per-channel weights, per-tensor static activations, minmax, "
             "targets Linear); each row a fresh process; the calibration peak is ru_maxrss when pipeline.calibrate "
             "returns (before make_resident), the whole-run peak ru_maxrss after the export", ""]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for model in [part for part in ("vit", "llama") if part in args.parts or (part == "vit" and {"torchrun", "vit-allocator"} & set(args.parts))]:
            folder = work / f"{model}-model"
            [built], build_s = run_child(["--build", model, str(folder), *(["--quick"] if args.quick else [])], args.threads)
            if model == "vit":
                title = ("ViT-L/14-size CLIPVisionModel (hidden 1024, 24 layers, 16 heads, intermediate 4096, patch 14, "
                         "image 224), random fp32 weights; 64 bundled images, batch 8, holdout 8")
            else:
                title = ("Llama-3.2-1B-config LlamaForCausalLM (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate "
                         "8192, vocab 128256, tied embeddings), random fp32 weights, planted-Llama word-level tokenizer; "
                         "16 bundled text segments of 128 tokens, batch 4, holdout 4")
            if args.quick:
                title = f"--quick {model}: {json.dumps(QUICK_VIT if model == 'vit' else QUICK_LLAMA)}"
            if model in args.parts:
                rows[model] = run_modes(model, folder, work, args.threads, repeats=args.repeats if model == "vit" else 1)
                lines += [f"## {title}",
                          f"{built['parameters'] / 1e6:.1f} M parameters, {built['bytes_on_disk'] / 1e9:.2f} GB of safetensors "
                          f"(built in {build_s:.0f} s); glibc's mmap threshold fixed at 128 KiB, as the CLI fixes it", ""]
                lines += mode_table(model, rows[model])
                left = {mode: run["offload_left"] for mode, runs in rows[model].items() for run in runs if run["offload_left"]}
                lines.append(f"- offload folder after the run: {'empty' if not left else left}")
                if model == "vit":
                    lines.append(f"- acceptance (sequential + offload_dir calibration peak <= 0.5x in_memory's): "
                                 f"{acceptance(rows[model])}")
                lines.append("")
            if model == "vit" and "vit-allocator" in args.parts:
                check = run_modes("vit", folder, work, args.threads, "dynamic", args.repeats)
                lines += ["## Allocator check: the same ViT-L/14-size runs with glibc's own dynamic mmap threshold",
                          "glibc raises its mmap threshold each time a big block is freed, after which blocks of that size come "
                          "from the heap, which fragments and keeps freed pages until malloc_trim; a fixed threshold keeps every "
                          "block over 128 KiB an mmap of its own, returned when freed.", ""]
                lines += mode_table("vit", check)
                lines += [f"- sequential + offload_dir calibration peak / in_memory's with glibc's dynamic threshold: "
                          f"{acceptance(check)}", ""]
            if model == "vit" and "torchrun" in args.parts:
                if "vit" not in rows:
                    rows["vit"] = run_modes("vit", folder, work, args.threads)
                lines += ["## 1 against 2 processes (torchrun --nproc-per-node 2 --standalone, gloo), ViT-L/14-size, in_memory", ""]
                lines += run_torchrun(folder, work, args.threads, rows["vit"]["in_memory"][0])
                lines.append("")
            shutil.rmtree(folder, ignore_errors=True)
    except BaseException:
        print("\n".join(lines), flush=True)  # the parts measured before the failure
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
