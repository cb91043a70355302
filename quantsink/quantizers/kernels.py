"""The int8 matmul kernels `Int8Linear` runs on, and the one choice per process of which.

Which int8 kernel is fast, and which is even exact, depends on the processor:

- `int-mm` (`torch._int_mm`, oneDNN's matmul on CPU) is fast on CUDA and on CPUs with AMX or
  AVX512-VNNI; on an AVX2-only CPU it measured 18-61x slower than fp32.
- `onednn` and `onednn-u8` (oneDNN's quantized linear, int8 or uint8 codes) and `fbgemm` are
  faster than fp32 on AVX2 too, and fuse the rescaling and the bias into the product.
- Without VNNI, the u8 x s8 instruction these kernels use (vpmaddubsw; oneDNN shifts int8
  codes to uint8 for it) adds each pair of products in int16 with saturation, so 8-bit codes
  near the top of the range (exactly the sink tokens' activations) come out wrong with no
  error. 7-bit codes shifted to u8 (at most 127) cannot saturate, so a W8A7 recipe keeps the
  uint8 kernels exact there.
- `float` (the fake backend's arithmetic: codes times scales, in fp32) gives the fake
  backend's outputs to the bit at about fp32 speed: the fallback, so that int8 is never many
  times slower than fp32.

So nothing is assumed. Once per process, per device type and activation width, every
available kernel runs an adversarial probe and must return the exact integer product (a kernel
that does not is no candidate). The exact ones are then timed against an fp32 linear of the same
shape, and the fastest is used. The choice is logged, `describe()` reports it (report.json, the
benchmarks), and a warning says what it costs when int8 is no faster than fp32 here.
`QUANTSINK_INT8_KERNEL=<name>` picks a kernel by hand; it must still be exact here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.nn import functional as F

from quantsink.errors import UserError
from quantsink.quantizers.functional import qrange
from quantsink.registry import INT8_KERNELS

log = logging.getLogger(__name__)

OVERRIDE = "QUANTSINK_INT8_KERNEL"

# cuBLAS's int8 GEMM behind torch._int_mm takes more than 16 rows and K, N multiples of 8;
# the CPU kernel takes any shape.
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8

# The probe: rows and columns at both ends of the code range and alternating between them (the
# largest int16 pair sums), then random codes; K is long enough to sum many pairs, and small
# enough that every exact sum is an integer float32 holds exactly (< 2**24).
PROBE_ROWS, PROBE_K = 16, 256
# The timing: a representative (rows, in, out) linear, in rounds that interleave the kernels with
# fp32 (so that a change of machine load hits them alike), as many as fit in BENCHMARK_SECONDS;
# a kernel already HOPELESS times slower than fp32 is not timed again.
BENCHMARK_SHAPE = (512, 1024, 1024)
BENCHMARK_ROUNDS, BENCHMARK_SECONDS = 10, 0.2
HOPELESS = 8.0


class Int8Kernel:
    """One way to compute (codes @ weight^T) * scale [* row_scale] + bias.

    `codes_dtype` and `shift` say how `to_codes` hands the input codes over (the unsigned
    kernels take them shifted by 2**(bits-1) into uint8); `ops` are the dispatcher names of the
    operators that compute the product (tests spy on them)."""

    name: str
    ops: tuple[str, ...]
    codes_dtype = torch.int8
    unsigned = False

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def shift(self, bits: int) -> int:
        return 2 ** (bits - 1) if self.unsigned else 0

    def pack(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], bits: int) -> Any:
        """Once per weight: `weight` int8 (out, in), `weight_scale` float32 (out,), `input_scale`
        float32 (1,) for static inputs or None for dynamic ones (then `run` gets the scales),
        `bias` float32 (out,) or None."""
        raise NotImplementedError

    def run(self, packed: Any, codes: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """float32 (rows, out) from `to_codes`' codes; `row_scale` is None for static inputs, (1, 1)
        for dynamic per-tensor inputs, (rows, 1) for dynamic per-token inputs."""
        raise NotImplementedError


def register(kernel_class: type[Int8Kernel]) -> type[Int8Kernel]:
    INT8_KERNELS.register(kernel_class.name)(kernel_class())
    return kernel_class


def to_codes(rows: torch.Tensor, scale: torch.Tensor, bits: int, kernel: Int8Kernel, clamp: bool = True) -> torch.Tensor:
    """`functional.quantize(rows, scale, 0, bits, symmetric=True)` as `kernel` takes it, computed
    in place: the fake backend's rounding (a division, not a multiplication by 1 / scale, which
    rounds differently near half-integers) in as few passes over the activations as eager
    PyTorch allows. `clamp=False` when `scale` is the rows' own range: nothing to clamp."""
    codes = torch.div(rows, scale).round_()
    if clamp:
        codes.clamp_(*qrange(bits, symmetric=True))
    if kernel.shift(bits):
        codes.add_(kernel.shift(bits))
    return codes if kernel.codes_dtype == codes.dtype else codes.to(kernel.codes_dtype)


def rescale(product: torch.Tensor, scale: Optional[torch.Tensor], row_scale: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """product [* scale] [* row_scale] + bias in float32, in as few passes over the output as can
    be: it is the largest tensor a layer touches. An int32 `product` is converted by the first
    pass; a float one is overwritten."""
    if scale is not None and row_scale is not None and row_scale.numel() == 1:
        scale, row_scale = scale * row_scale.reshape(1), None
    if scale is not None and row_scale is not None:
        product = torch.mul(product, row_scale)
    factor = scale if scale is not None else row_scale
    if not product.is_floating_point():
        return torch.mul(product, factor) if bias is None else torch.addcmul(bias, product, factor)
    return product.mul_(factor) if bias is None else torch.addcmul(bias, product, factor, out=product)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32 with torch._int_mm, exactly, whatever the shape."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if a.device.type == "cuda" and a.shape[1] % CUDA_MULTIPLE == 0 and b.shape[1] % CUDA_MULTIPLE == 0:
        rows = a.shape[0]
        if rows < CUDA_MIN_ROWS:  # zero rows add nothing to the others
            a = torch.cat([a, a.new_zeros(CUDA_MIN_ROWS - rows, a.shape[1])])
        return torch._int_mm(a, b)[:rows]
    # float64 holds every int32 sum of int8 products exactly up to K = 2**53 / 127**2
    return (a.double() @ b.double()).to(torch.int32)


@register
class IntMM(Int8Kernel):
    name, ops = "int-mm", ("aten::_int_mm",)

    def available(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def pack(self, weight, weight_scale, input_scale, bias, bits):
        scale = weight_scale if input_scale is None else weight_scale * input_scale
        return weight.t(), scale, bias  # the transposed view: measured faster on CPU than a contiguous copy

    def run(self, packed, codes, row_scale):
        weight_t, scale, bias = packed
        return rescale(int8_matmul(codes, weight_t), scale, row_scale, bias)


@register
class OneDNN(Int8Kernel):
    """oneDNN's int8 linear (what Inductor's x86 quantization lowers to): the input scale, the
    weight scales and the bias are applied inside the product, which comes out in float32."""

    name, ops = "onednn", ("onednn::qlinear_pointwise",)

    def available(self, device):
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")

    def pack(self, weight, weight_scale, input_scale, bias, bits):
        packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)  # the layout suits any row count
        scale = weight_scale if input_scale is None else weight_scale * input_scale
        weight_zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        return packed, scale, weight_zero_points, bias, self.shift(bits), torch.tensor([self.shift(bits)])

    def run(self, packed, codes, row_scale):
        weight, scale, weight_zero_points, bias, zero_point, zero_point_tensor = packed
        qlinear = torch.ops.onednn.qlinear_pointwise
        if row_scale is None:
            return qlinear(codes, 1.0, zero_point, weight, scale, weight_zero_points, bias,
                           1.0, 0, torch.float32, "none", [], "")
        if row_scale.numel() == 1:
            return qlinear.tensor(codes, row_scale.reshape(1), zero_point_tensor, weight, scale, weight_zero_points, bias,
                                  1.0, 0, torch.float32, "none", [], "")
        # oneDNN takes one input scale per tensor: per-token scales are applied after the product
        product = qlinear(codes, 1.0, zero_point, weight, scale, weight_zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        return rescale(product, None, row_scale, bias)


@register
class OneDNNUnsigned(OneDNN):
    """oneDNN with uint8 codes (zero point 2**(bits-1)): exact for 7-bit codes without VNNI, where
    the int8 form is not (oneDNN shifts int8 codes to uint8 itself, by 128: up to 191, whose pair
    products overflow int16)."""

    name = "onednn-u8"
    codes_dtype = torch.uint8
    unsigned = True


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """torch's quantized engine is a process-wide setting that packing reads: set it for the
    packing only."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@register
class FBGEMM(Int8Kernel):
    """fbgemm's int8 linear with float input and output. It quantizes its float input itself
    (x / 1.0 + zero point: exact for integer codes, which `to_codes` hands it), and applies the
    weight scales and the bias inside the product."""

    name, ops = "fbgemm", ("quantized::linear_with_input_q_dq_qweight_dq_output_fp32",)
    codes_dtype = torch.float32

    def available(self, device):
        return (device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
                and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))

    def pack(self, weight, weight_scale, input_scale, bias, bits):
        # fbgemm divides its input by the input scale it is given, so it gets 1.0 and the real
        # one goes with the weight scales, or, dynamic, after the product, and the bias after it
        dynamic = input_scale is None
        scale = weight_scale if dynamic else weight_scale * input_scale
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch deprecates the quantized tensor types, which are fbgemm's only way in
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(weight.contiguous(), scale.double(), zero_points, 0)
        with quantized_engine("fbgemm"):
            packed = torch.ops.quantized.linear_prepack(weight, None if dynamic else bias)
        return packed, 2 ** (bits - 1), bias if dynamic else None

    def run(self, packed, codes, row_scale):
        weight, zero_point, late_bias = packed
        product = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, zero_point, weight)
        return product if row_scale is None else rescale(product, None, row_scale, late_bias)


@register
class Float(Int8Kernel):
    """The fake backend's arithmetic: codes times scales in float32, multiplied by the float32
    weight the fake backend holds, so that it gives the fake backend's outputs to the bit.
    Keeps that float32 weight."""

    name, ops = "float", ("aten::mm", "aten::addmm")
    codes_dtype = torch.float32

    def available(self, device):
        return True

    def pack(self, weight, weight_scale, input_scale, bias, bits):
        return weight.float() * weight_scale.reshape(-1, 1), input_scale, bias

    def run(self, packed, codes, row_scale):
        weight, input_scale, bias = packed
        return F.linear(codes.mul_(input_scale if row_scale is None else row_scale), weight, bias)


# --- the choice -------------------------------------------------------------------------

EXACT = "exact"


@dataclass
class Measurement:
    """What the probe and the timing found on one device type for one code width."""

    probes: dict[str, str]  # kernel name -> EXACT, or why it is no candidate
    speed: dict[str, float]  # exact kernels: fp32 time / kernel time
    threads: int = field(default_factory=torch.get_num_threads)  # torch's, when timed


@dataclass
class Choice:
    kernel: Int8Kernel
    measurement: Measurement
    override: Optional[str]


_MEASURED: dict[tuple[str, int], Measurement] = {}
_CHOSEN: dict[tuple[str, int], Choice] = {}
_WARNED: set[str] = set()


def chosen(device: torch.device, bits: int) -> Int8Kernel:
    """The kernel int8 layers with `bits`-bit input codes run on `device`: chosen on first use."""
    choice = _CHOSEN.get((device.type, bits))
    if choice is None:
        choice = _CHOSEN[device.type, bits] = choose(device, bits)
        announce(device, bits, choice)
    return choice.kernel


def choose(device: torch.device, bits: int) -> Choice:
    override = os.environ.get(OVERRIDE) or None
    if override is not None and override not in INT8_KERNELS:
        raise UserError(f"{OVERRIDE}: {INT8_KERNELS.unknown_message(override)}")
    measurement = measured(device, bits)
    exact = [name for name, verdict in measurement.probes.items() if verdict == EXACT]
    if override is not None:
        kernel = INT8_KERNELS.get(override)
        verdict = measurement.probes[kernel.name]
        if verdict != EXACT:
            raise UserError(f"{OVERRIDE}={override} cannot run {bits}-bit codes on {device.type} here: {verdict}; "
                            f"exact here: {', '.join(exact)}")
        return Choice(kernel, measurement, override)
    if not exact:  # the float kernel is exact unless float32 matmuls are made inexact (TF32)
        raise RuntimeError(f"no int8 kernel is exact on {device.type} here: {measurement.probes}")
    return Choice(INT8_KERNELS.get(fastest(measurement)), measurement, None)


def fastest(measurement: Measurement) -> str:
    return max(measurement.speed, key=measurement.speed.__getitem__)


def measured(device: torch.device, bits: int) -> Measurement:
    key = (device.type, bits)
    if key not in _MEASURED:
        with torch.inference_mode():
            probes = {name: probe(kernel, device, bits) for name, kernel in INT8_KERNELS.items()}
            exact = {name: INT8_KERNELS.get(name) for name, verdict in probes.items() if verdict == EXACT}
            _MEASURED[key] = Measurement(probes, benchmark(exact, device, bits))
    return _MEASURED[key]


def probe(kernel: Int8Kernel, device: torch.device, bits: int) -> str:
    """EXACT when `kernel` computes the probe's integer product exactly, else why it is no candidate."""
    if not kernel.available(device):
        return f"unavailable on {device.type}"
    top = qrange(bits, symmetric=True)[1]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(-top, top + 1, (PROBE_ROWS, PROBE_K), generator=generator)
    weight = torch.randint(-127, 128, (PROBE_ROWS, PROBE_K), generator=generator)
    alternating = torch.tensor([1, -1]).repeat(PROBE_K // 2)
    for row, signs in enumerate((1, -1, alternating, -alternating)):
        inputs[row], weight[row] = signs * top, signs * 127
    weight = weight.to(torch.int8).to(device)
    exact = inputs.double() @ weight.double().cpu().t()
    try:
        one = torch.ones(1, device=device)
        packed = kernel.pack(weight, one.expand(PROBE_ROWS), one, None, bits)
        got = kernel.run(packed, to_codes(inputs.float().to(device), torch.ones((1, 1), device=device), bits, kernel), None)
    except (RuntimeError, NotImplementedError) as error:  # an operator this build or CPU lacks
        return f"fails here: {str(error).splitlines()[0]}"
    wrong = (got.double().cpu() != exact).nonzero()
    if len(wrong) == 0:
        return EXACT
    row, column = wrong[0].tolist()
    smaller = abs(got[row, column].item()) < abs(exact[row, column].item())
    return (f"not exact here: {got[row, column].item():.0f} where the integer product is {exact[row, column].item():.0f}"
            + (" (too small, as when u8 x s8 pairs saturate in int16 without VNNI)" if smaller else ""))


def benchmark(kernels: dict[str, Int8Kernel], device: torch.device, bits: int) -> dict[str, float]:
    """fp32 time / kernel time for an inference linear of BENCHMARK_SHAPE, input quantization included."""
    rows, inputs, outputs = BENCHMARK_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inputs, generator=generator).to(device)
    weight = torch.randint(-127, 128, (outputs, inputs), generator=generator).to(torch.int8).to(device)
    weight_scale = torch.rand(outputs, generator=generator).add_(0.5).div_(127).to(device)
    bias = torch.randn(outputs, generator=generator).to(device)
    input_scale = x.abs().amax().reshape(1, 1) / qrange(bits, symmetric=True)[1]
    fp32_weight = weight.float() * weight_scale.reshape(-1, 1)

    def calls(kernel: Int8Kernel) -> Callable[[], Any]:
        packed = kernel.pack(weight, weight_scale, input_scale.reshape(1), bias, bits)
        return lambda: kernel.run(packed, to_codes(x, input_scale, bits, kernel), None)

    candidates = {"fp32": lambda: F.linear(x, fp32_weight, bias), **{name: calls(k) for name, k in kernels.items()}}
    started = time.perf_counter()
    seconds = {name: [timed(call, device)] for name, call in candidates.items()}  # the first call: warm-up
    for done in range(BENCHMARK_ROUNDS):
        for name, call in candidates.items():
            if done == 0 or seconds[name][-1] < HOPELESS * min(seconds["fp32"][1:]):
                seconds[name].append(timed(call, device))
        if time.perf_counter() - started > BENCHMARK_SECONDS:
            break
    fp32 = min(seconds.pop("fp32")[1:])
    return {name: fp32 / min(times[1:]) for name, times in seconds.items()}


def timed(call: Callable[[], Any], device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - started


# Environment variables that make a CPU's libraries use fewer instructions than it has (how an
# AVX2-only CPU is emulated): the probe sees their effect, the CPU flags do not.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> dict[str, Any]:
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vnni": torch.cpu._is_vnni_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
    }


def hardware(device: torch.device) -> str:
    if device.type != "cpu":
        return device.type
    flags = cpu_flags()
    limits = "".join(f", {name}={value}" for name, value in flags["isa_limits"].items())
    return (f"CPU ({flags['cpu_capability']}, VNNI {'yes' if flags['vnni'] else 'no'}, "
            f"AMX {'yes' if flags['amx'] else 'no'}{limits})")


def verdicts(measurement: Measurement, names: list[str]) -> str:
    """The kernels' speeds, or why they are no candidates (one reason for all it applies to)."""
    by_verdict: dict[str, list[str]] = {}
    for name in names:
        by_verdict.setdefault(measurement.probes[name], []).append(name)
    return "; ".join(
        ", ".join(f"{name} {measurement.speed[name]:.2f}x" for name in group) if verdict == EXACT
        else f"{', '.join(group)}: {verdict}"
        for verdict, group in by_verdict.items()
    )


def announce(device: torch.device, bits: int, choice: Choice) -> None:
    """Log the choice; warn, once per process, when it is no faster than fp32."""
    kernel, measurement = choice.kernel.name, choice.measurement
    log.info("int8 kernel for %d-bit inputs on %s: %s%s, %.2fx an fp32 linear of %s on this %s, %d threads; others: %s",
             bits, device.type, kernel, f" (set by {OVERRIDE})" if choice.override else "", measurement.speed[kernel],
             "x".join(map(str, BENCHMARK_SHAPE)), hardware(device), measurement.threads,
             verdicts(measurement, [name for name in measurement.probes if name != kernel]))
    if measurement.speed[kernel] < 1:
        warn_once(slow_message(device, bits, choice))


def slow_message(device: torch.device, bits: int, choice: Choice) -> str:
    measurement = choice.measurement
    ratio = measurement.speed[choice.kernel.name]
    message = f"int8 layers run at ~{ratio:.2f}x fp32 speed on this {hardware(device)}: "
    if choice.override:
        best = fastest(measurement)
        message += f"{OVERRIDE} picks {choice.kernel.name}; the fastest exact kernel here is {best} ({measurement.speed[best]:.2f}x)"
    else:
        inexact = [name for name, verdict in measurement.probes.items()
                   if verdict != EXACT and not verdict.startswith("unavailable")]
        message += "no exact int8 kernel here is faster than fp32" + (f" ({verdicts(measurement, inexact)})" if inexact else "")
    message += ". Use backend fake for fp32 speed"
    if bits == 8 and not choice.override:
        narrow = measured(device, 7)
        best = fastest(narrow)
        if narrow.speed[best] > 1:
            message += f", or activations bits 7 (exact on {best} here, {narrow.speed[best]:.2f}x fp32)"
    return message


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def describe(device: str | torch.device = "cpu", bits: int = 8) -> dict[str, Any]:
    """The kernel int8 layers use on `device` for `bits`-bit inputs, and why (for report.json)."""
    device = torch.device(device)
    kernel = chosen(device, bits)
    choice = _CHOSEN[device.type, bits]
    return {
        "kernel": kernel.name,
        "device": device.type,
        "activation_bits": bits,
        **(cpu_flags() if device.type == "cpu" else {}),
        "threads": choice.measurement.threads,
        "override": choice.override,
        "probe": dict(choice.measurement.probes),
        "speed_vs_fp32": {name: round(ratio, 2) for name, ratio in choice.measurement.speed.items()},
        "benchmark_shape": list(BENCHMARK_SHAPE),
    }


def warn_about_int_mm(device: torch.device) -> None:
    """Warn, once per process, when torch._int_mm, which torchao's int8 W8A8 workflows run, is
    not exact or is slower than fp32 on `device` (this module's measurement)."""
    measurement = measured(device, 8)
    verdict = measurement.probes[IntMM.name]
    if verdict == EXACT and measurement.speed[IntMM.name] >= 1:
        return
    problem = verdict if verdict != EXACT else f"{measurement.speed[IntMM.name]:.2f}x an fp32 linear on this {hardware(device)}"
    best = fastest(measurement)
    warn_once(f"torchao's int8 W8A8 runs torch._int_mm on {device.type} ({IntMM.name}: {problem}): "
              f"backend int8 runs exact kernels only; the fastest here is {best}, {measurement.speed[best]:.2f}x fp32")
