"""End-to-end CPU latency of real int8 execution on a ViT-B/16-size model, and checkpoint sizes.

    python benchmarks/int8_speed.py [--threads 2] [--batch 8] [--repeats 7]

The model is a transformers CLIPVisionModel with the CLIP ViT-B/16 configuration (86M
parameters, 197 tokens) and random weights: speed does not depend on the weights. Every
quantsink and torchao variant is quantized through `quantsink.quantize` (calibrated on the
bundled photographs). When onnxruntime is installed (`pip install onnxruntime onnx`), the same
model exported with torch.onnx runs in it too, in fp32 and quantized by onnxruntime itself:
`quantize_dynamic` (int8 weights per tensor, uint8 inputs per tensor) and `quantize_static`
(QDQ, int8 weights per channel, uint8 inputs, calibrated on the same photographs, MatMul and
Gemm only, as quantsink quantizes the Linear layers only). onnxruntime also fuses the
attention, LayerNorm and GELU, which quantsink leaves to PyTorch.

Everything is timed in the same process on the same batch; the timing rounds interleave the
variants, so that a change of machine load hits them all alike. Latency is the median over the
rounds after one warm-up call each; ratios are fp32 (PyTorch) latency / variant latency (higher
is faster); the cosine is that of each variant's pooled output to fp32's on the timed batch
(random pixels: a check that the variant computes what fp32 does, not an accuracy figure).
The machine's load average is printed beside them: on a shared machine other
processes preempt torch's threads, which slows every variant but a 2-thread one most (each
parallel op waits for its slowest thread), so `--threads 1` gives the steadier ratios there.
The int8 kernel quantsink chose for this CPU (`quantsink.quantizers.kernels.describe`) is
printed with the CPU's capability and the kernel's speed against fp32 on one linear.
Checkpoint sizes are those of `model.safetensors`: fp32 as saved unquantized, and the int8
export of the W8A8 static model."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import quantsink
from quantsink.data import load_samples
from quantsink.models import resolve, save_model
from quantsink.quantizers import kernels

CALIBRATION = {"data": "bundled", "num_samples": 8, "batch_size": 8, "holdout": 8, "seed": 0}
PER_TOKEN = {"granularity": "per_token", "dynamic": True}
STATIC = "quantsink int8 W8A8 per-tensor static"
# name -> (quantization section, export format)
VARIANTS = {
    STATIC: ({"backend": "int8"}, "int8"),
    # the inputs the fast uint8 kernels multiply exactly on CPUs without VNNI
    "quantsink int8 W8A7 per-tensor static": ({"backend": "int8", "activations": {"bits": 7}}, "int8"),
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


def torch_call(model: torch.nn.Module, pixels: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call():
        with torch.inference_mode():
            return model(pixel_values=pixels).pooler_output

    return call


def onnxruntime_calls(fp32: CLIPVisionModel, pixels: torch.Tensor, calibration: torch.Tensor, threads: int,
                      folder: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """The fp32 model exported to ONNX, and onnxruntime's own int8 quantizations of it."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Photographs(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": calibration.numpy()}])

        def get_next(self):
            return next(self.batches, None)

    fp32_path, dynamic_path, static_path = (folder / f"{name}.onnx" for name in ("fp32", "dynamic", "static"))
    torch.onnx.export(fp32, (pixels,), str(fp32_path), input_names=["pixel_values"],
                      output_names=["last_hidden_state", "pooler_output"], opset_version=17, dynamo=False)
    # onnxruntime's quantizers suggest a pre-processing pass on the root logger: not needed here
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(fp32_path), str(dynamic_path), weight_type=QuantType.QInt8)
    quantize_static(str(fp32_path), str(static_path), Photographs(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    feed = {"pixel_values": pixels.numpy()}
    calls = {}
    for name, path in (("fp32", fp32_path), ("int8 dynamic (quantize_dynamic)", dynamic_path),
                       ("int8 static QDQ (quantize_static)", static_path)):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        calls[f"onnxruntime {onnxruntime.__version__} {name}"] = (
            lambda session=session: torch.from_numpy(session.run(["pooler_output"], feed)[0]))
    return calls


def timed(call: Callable[[], torch.Tensor]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def kernel_line(bits: int) -> str:
    description = kernels.describe("cpu", bits)
    kernel = description["kernel"]
    others = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in description["speed_vs_fp32"].items() if name != kernel)
    inexact = sorted(name for name, verdict in description["probe"].items() if verdict != kernels.EXACT)
    return (f"  {bits}-bit inputs: {kernel}, {description['speed_vs_fp32'][kernel]:.2f}x an fp32 linear of "
            f"{'x'.join(map(str, description['benchmark_shape']))} (other exact kernels: {others or 'none'}"
            f"{'; not candidates: ' + ', '.join(inexact) if inexact else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch (and onnxruntime) threads for every variant (default 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = vit_b16()
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = {"fp32": torch_call(fp32, pixels)}
    results = {}
    for name, (quantization, export_format) in VARIANTS.items():
        results[name] = quantsink.quantize(copy.deepcopy(fp32), recipe(quantization, export_format), progress=False)
        calls[name] = torch_call(results[name].model, pixels)

    with tempfile.TemporaryDirectory() as scratch:
        if importlib.util.find_spec("onnxruntime") is not None:
            adapter = resolve(fp32)
            samples = load_samples("bundled", adapter.modality, CALIBRATION["num_samples"], CALIBRATION["holdout"], seed=0)
            calibration = adapter.preprocess(samples.calibration)["pixel_values"]
            calls.update(onnxruntime_calls(fp32, pixels, calibration, args.threads, Path(scratch)))

        pooled = {name: call() for name, call in calls.items()}  # the warm-up
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                seconds[name].append(timed(call))

        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"CLIP ViT-B/16 vision tower (random weights), batch {args.batch}, 224x224, "
              f"{args.threads} threads, median of {args.repeats} interleaved rounds; "
              f"load average {load} on {os.cpu_count()} CPUs")
        baseline = statistics.median(seconds["fp32"])
        print(f"  {'':<58} {'latency':>11}   {'speed':>9}   cosine to fp32")
        for name, times in seconds.items():
            median = statistics.median(times)
            cosine = torch.nn.functional.cosine_similarity(pooled[name], pooled["fp32"], dim=-1).mean().item()
            print(f"  {name:<58} {median * 1000:8.0f} ms   {baseline / median:5.2f}x fp32   {cosine:.4f}")

        print(f"quantsink's int8 kernels on this {kernels.hardware(torch.device('cpu'))}, torch {torch.__version__}:")
        for bits in (8, 7):
            print(kernel_line(bits))

        fp32_folder = save_model(resolve(fp32), Path(scratch) / "fp32")
        int8_folder = results[STATIC].save(Path(scratch) / "int8")
        fp32_bytes = (fp32_folder / "model.safetensors").stat().st_size
        int8_bytes = (int8_folder / "model.safetensors").stat().st_size
    print(f"checkpoint: fp32 {fp32_bytes / 2**20:.1f} MiB, int8 export {int8_bytes / 2**20:.1f} MiB, "
          f"ratio {int8_bytes / fp32_bytes:.3f}")


if __name__ == "__main__":
    main()
