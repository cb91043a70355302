"""`quantsink quantize MODEL RECIPE`, `quantsink eval OUT`, `quantsink inspect MODEL`,
`quantsink models`. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from quantsink.errors import UserError
from quantsink.memory import keep_large_allocations_mapped

if TYPE_CHECKING:
    from quantsink.recipe import Recipe

log = logging.getLogger("quantsink")


class _DropThirdPartyNoise(logging.Filter):
    """Drops log records that dependencies emit at import and that tell a quantsink user
    nothing they can act on. Only the exact messages listed; quantsink's own loggers untouched."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# Only exact messages, each on the logger of the module that emits it:
_NOISE = {
    # torchao (imported by transformers whenever it is installed) registers its enums as pytree
    # constants, and torch >= 2.14 warns once per enum that this is deprecated: a note for
    # torchao's developers, printed on every run that loads a transformers model
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    # optimum-quanto imports torch's extension builder, which warns on a machine with a CUDA
    # toolkit and no GPU; quantsink builds no extension (on CPU quanto runs its Python kernels)
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


def drop_third_party_noise() -> None:
    """The CLI's own logging setup, like basicConfig: done when it runs, never at import, and
    once however often `main` runs in one process."""
    for name, fragment in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropThirdPartyNoise) for existing in logger.filters):
            logger.addFilter(_DropThirdPartyNoise(fragment))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantsink", description="Post-training quantization for transformers with sink tokens."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser(
        "quantize",
        help="quantize a model as a recipe says and write the result folder",
        description="Calibrate, quantize and export MODEL as RECIPE says; print the fidelity report.",
    )
    quantize.add_argument("model", metavar="MODEL",
                          help="short name (see 'quantsink models'), hf:ORG/NAME, open_clip:ARCH/PRETRAINED, timm:NAME, or a local folder")
    quantize.add_argument("recipe", metavar="RECIPE", type=Path, help="YAML recipe (see recipes/)")
    quantize.add_argument("-o", "--output", type=Path, metavar="OUT",
                          help="output folder, must not exist (default: out/<recipe name>)")
    quantize.add_argument("--calib", metavar="DATA",
                          help="calibration data: 'bundled', an image folder, a text file or a folder of text files")
    quantize.add_argument("--num-samples", type=int, metavar="N", help="calibration samples (overrides the recipe)")
    quantize.add_argument("--seed", type=int, metavar="S", help="sampling seed (overrides the recipe)")
    quantize.add_argument("--pipeline", choices=("in_memory", "sequential"),
                          help="calibration passes: each batch through the whole model, or the whole set through one "
                               "block at a time (overrides the recipe's execution.pipeline)")
    quantize.add_argument("--offload-dir", type=Path, metavar="DIR",
                          help="keep the block inputs and the weights on disk there, one block resident at a time "
                               "(implies --pipeline sequential; the model must be a local folder)")
    quantize.add_argument("--device", metavar="DEVICE",
                          help="where the model computes: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N, "
                               "mps or xpu (overrides the recipe's execution.device)")
    quantize.add_argument("--device-map", choices=("auto",),
                          help="let accelerate spread a transformers model over the GPUs (in_memory only; the recipe's "
                               "execution.max_memory bounds each device)")
    add_verbosity(quantize)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity and KL of a causal LM with its quantized KV cache vs full precision",
        description="Chunked prefill of held-out text through the full-precision cache and through the folder's "
                    "quantized KV cache; print and write OUT/eval.json.",
    )
    evaluate.add_argument("folder", metavar="OUT", type=Path, help="a folder 'quantsink quantize' wrote with a kv_cache recipe")
    evaluate.add_argument("--text", metavar="FILE",
                          help="text file or folder to evaluate on (default: the held-out part of the recipe's calibration data)")
    evaluate.add_argument("--chunk-size", type=int, default=16, metavar="N",
                          help="tokens per prefill chunk; each token sees the earlier chunks through the quantized cache (default 16)")
    evaluate.add_argument("--num-samples", type=int, metavar="N", help="text segments to evaluate (default: the recipe's holdout count)")
    add_verbosity(evaluate)

    inspect = commands.add_parser(
        "inspect",
        help="show where a model's sinks and massive activations are, and recommend a recipe",
        description="Run MODEL on calibration data and write OUT/inspect.json, PNG figures, inspect.md, a self-contained "
                    "inspect.html and recommended.yaml: residual l_inf per layer and token, the massive channels and "
                    "where they emerge, attention received per token, per-layer quantization sensitivity (and KV "
                    "sensitivity and the KVSink profile for causal LMs).",
    )
    inspect.add_argument("model", metavar="MODEL",
                         help="short name (see 'quantsink models'), hf:ORG/NAME, open_clip:ARCH/PRETRAINED, timm:NAME, or a local folder")
    inspect.add_argument("--calib", metavar="DATA",
                         help="calibration data: 'bundled' (default), an image folder, a text file or a folder of text files")
    inspect.add_argument("--num-samples", type=int, default=32, metavar="N", help="calibration samples to inspect (default 32)")
    inspect.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    inspect.add_argument("-o", "--output", type=Path, metavar="OUT",
                         help="output folder, must not exist (default: out/inspect-<model>)")
    add_verbosity(inspect)

    models = commands.add_parser("models", help="list the short model names and their sources",
                                 description="List the short model names, the sources they map to and their families.")
    add_verbosity(models)
    return parser


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")


def run_quantize(args: argparse.Namespace) -> None:
    from quantsink import distributed, io
    from quantsink.api import quantize
    from quantsink.recipe import Recipe

    recipe = with_execution(Recipe.from_yaml(args.recipe), args.pipeline, args.offload_dir, args.device, args.device_map)
    output = args.output or Path("out") / recipe.name
    try:
        if distributed.initialize(recipe.execution.device) and not distributed.is_main():
            quiet_down()  # under torchrun rank 0 reports for all ranks
        if distributed.is_main():  # the rank that writes it: another could find it already written
            io.check_output_dir(output)  # before any calibration: a result that cannot be written is time lost
        result = quantize(args.model, recipe, args.calib,
                          num_samples=args.num_samples, seed=args.seed, progress=not args.quiet)
        result.save(output)
        if distributed.is_main():
            print(format_summary(result.report, output))
    finally:
        distributed.teardown()


def with_execution(recipe: Recipe, pipeline: Optional[str], offload_dir: Optional[Path], device: Optional[str] = None,
                   device_map: Optional[str] = None) -> Recipe:
    """The recipe with --pipeline, --offload-dir, --device and --device-map in its execution section."""
    from quantsink.recipe import Recipe

    if pipeline is None and offload_dir is None and device is None and device_map is None:
        return recipe
    execution = recipe.execution.model_dump()
    if offload_dir is not None:
        execution.update(pipeline="sequential", offload_dir=str(offload_dir))
    if pipeline is not None:
        execution["pipeline"] = pipeline
    if device is not None:
        execution["device"] = device
    if device_map is not None:
        execution["device_map"] = device_map
    return Recipe.from_dict({**recipe.to_dict(), "execution": execution}, origin="recipe with command-line overrides")


def format_regcache_lines(regcache: dict) -> list[str]:
    validation = regcache["validation"]
    cost = regcache["cost"]
    passes = f"{cost['calibration_passes']:.1f} calibration passes" if "calibration_passes" in cost else f"{cost['seconds']:.1f} s"
    chosen = (f"regcache   {regcache['variant']}: l_q {regcache['sensitive_layer']}, prefix from block {regcache['prefix_start']} "
              f"(tau {regcache['num_registers']}, {regcache['prefix_blocks']}), delete {regcache['delete_tokens']}; cost {passes}")
    if validation is None:
        return [chosen + " (every field set by the recipe)"]
    variants = ", ".join(f"{variant} {validation[variant]['centered_cosine_mean']:.4f}"
                         for variant in ("naive", "prefix-only", "delete-only", "both") if variant in validation)
    return [
        chosen,
        f"           validation centred cosine ({validation['images']} images): {variants}; "
        f"chosen {validation['chosen']['centered_cosine_mean']:.4f}",
    ]


def format_summary(report: dict, output: Path) -> str:
    calibration = report["calibration"]
    lines = [f"model      {report['model']} ({report['family']}), recipe {report['recipe']}"]
    if "fidelity" in report:
        fidelity = report["fidelity"]
        worst = max(report["outliers"], key=lambda block: block["max_over_median"])
        lines += [
            f"data       {calibration['data']}; calibration pass {calibration['seconds']:.1f} s",
            f"quantized  {report['quantized_modules']} modules",
            f"fidelity   cosine mean {fidelity['cosine_mean']:.4f}, min {fidelity['cosine_min']:.4f}, centred cosine "
            f"{fidelity['centered_cosine_mean']:.4f}, relative L2 {fidelity['relative_l2']:.4f}, rank agreement "
            f"{fidelity['rank_agreement']:.3f} on {fidelity['samples']} holdout samples",
            f"outliers   largest max/median token norm {worst['max_over_median']:.1f}x at {worst['block']}",
        ]
        for kernel in report.get("int8_kernels", []):
            speed = kernel["speed_vs_fp32"].get(kernel["kernel"])
            measured = f", {speed:.2f}x an fp32 linear here" if speed is not None else ""
            lines.append(f"kernel     int8 matmuls on {kernel['kernel']} ({kernel['device']}{measured})")
    else:
        lines.append(f"data       {calibration['data']}")
    if "regcache" in report["methods"]:
        lines += format_regcache_lines(report["methods"]["regcache"])
    if "kvsink" in report["methods"]:
        profile = report["methods"]["kvsink"]
        lines.append(
            f"kvsink     outlier channel {profile['channels'][0]} emerges at block {profile['emergence_layer']} "
            f"({profile['peak'] / profile['scale']:.0f}x a typical token's RMS)"
        )
    if "kv_cache" in report:
        lines += format_kv_lines(report["kv_cache"])
    lines.append(f"written    {output}")
    return "\n".join(lines)


def format_kv_lines(kv: dict) -> list[str]:
    return [
        f"kv cache   {kv['scheme']}",
        f"perplexity full precision {kv['perplexity_reference']:.3f}, quantized cache {kv['perplexity_quantized']:.3f} "
        f"({kv['tokens']} tokens, chunks of {kv['chunk_size']})",
        f"KL         {kv['kl_mean']:.5f} nats per token; {kv['bytes_per_token']:.0f} bytes per token "
        f"({kv['compression']:.2f}x smaller than fp16)",
    ]


def run_eval(args: argparse.Namespace) -> None:
    from quantsink.api import evaluate_kv_cache

    result = evaluate_kv_cache(args.folder, text=args.text, chunk_size=args.chunk_size,
                               num_samples=args.num_samples, progress=not args.quiet, write=True)
    print("\n".join([f"model      {args.folder}", *format_kv_lines(result), f"written    {args.folder / 'eval.json'}"]))


def run_inspect(args: argparse.Namespace) -> None:
    from quantsink import io
    from quantsink.inspection.run import inspect, output_name

    output = args.output or Path("out") / output_name(args.model)
    io.check_output_dir(output)  # before the model runs: a result that cannot be written is time lost
    inspection = inspect(args.model, args.calib, num_samples=args.num_samples, seed=args.seed, progress=not args.quiet)
    inspection.save(output)
    print(format_inspection(inspection.data, output))


def format_inspection(data: dict, output: Path) -> str:
    massive = data["massive"]
    channels = ", ".join(f"{entry['channel']} ({entry['ratio']:.0f}x)" for entry in massive["channels"][:3])
    lines = [f"model      {data['model']} ({data['family']}), {data['calibration']['data']}",
             f"massive    emergence block {massive['emergence_block']}; channels {channels or 'none'} ({massive['source']})"]
    if "sensitive_layer" in data:
        lines.append(f"sensitive  l_q block {data['sensitive_layer']['block']} ({data['sensitive_layer']['linear']})")
    if "kvsink" in data:
        sinks = data["kvsink"]["sample_sinks"][0]
        lines.append("sinks      sample 0: " + ", ".join(f"{entry['position']} {entry['token']!r}" for entry in sinks["kvsink"])
                     + f" (PFN-5 keeps 0-{len(sinks['pfn']) - 1})")
    lines += [f"recommend  {entry['choice']}" for entry in data["recommended"]["reasons"]]
    lines.append(f"written    {output} (inspect.html, inspect.md, recommended.yaml)")
    return "\n".join(lines)


def run_models(_args: argparse.Namespace) -> None:
    from quantsink.models import catalog

    rows = [("NAME", "SOURCE", "FAMILY", "NOTE")] + [tuple(str(cell) for cell in row) for row in catalog()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + ("  " + row[3] if row[3] else ""))


def quiet_down() -> None:
    """Warnings and errors only, and no progress bar of transformers (its weight-loading bar
    ignores our logging level)."""
    from transformers.utils import logging as transformers_logging

    logging.getLogger().setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    drop_third_party_noise()
    keep_large_allocations_mapped()  # the process is ours (quantsink.memory)
    if args.quiet and args.command != "models":  # `models` loads nothing: keep it free of transformers
        quiet_down()
    try:
        if args.command != "quantize" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"quantsink {args.command} runs in one process; torchrun --nproc-per-node N shards the calibration "
                            "of quantsink quantize only: run it without torchrun")
        {"quantize": run_quantize, "eval": run_eval, "inspect": run_inspect, "models": run_models}[args.command](args)
    except UserError as error:
        # under torchrun every rank that fails says so (torchrun then ends the others); RANK is
        # torchrun's, read without importing torch
        rank = os.environ.get("RANK", "0")
        print(f"quantsink: error{'' if rank == '0' else f' (rank {rank})'}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantsink: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
