"""The int8 kernels and the choice among them: every kernel exact on this machine gives the
fake backend's outputs; a kernel whose products saturate is found out and never chosen; the
override and the slow-CPU warning say what they do in one line."""
import copy
import json
import logging

import pytest
import torch

from quantsink.errors import UserError
from quantsink.quantizers import kernels
from quantsink.quantizers.int8 import Int8Quantizer
from quantsink.registry import INT8_KERNELS
from int8_helpers import ACTIVATIONS, OperatorSpy, calibrated, check_int8_gives_the_fake_outputs, config, mlp

CPU = torch.device("cpu")
QUANTIZED_INPUTS = {name: args for name, args in ACTIVATIONS.items() if args is not None}


@pytest.fixture(autouse=True)
def no_choice_yet(monkeypatch):
    """Each test chooses anew (the measurements are kept: they do not depend on the test)."""
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.delenv(kernels.OVERRIDE, raising=False)


def force(monkeypatch, name: str, bits: int) -> None:
    verdict = kernels.measured(CPU, bits).probes[name]
    if verdict != kernels.EXACT:
        pytest.skip(f"{name} for {bits}-bit codes here: {verdict}")
    monkeypatch.setenv(kernels.OVERRIDE, name)


@pytest.mark.parametrize("activations", QUANTIZED_INPUTS.values(), ids=QUANTIZED_INPUTS.keys())
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("kernel", INT8_KERNELS.names())
def test_every_exact_kernel_gives_the_fake_outputs_within_float_rounding(monkeypatch, kernel, bits, weights, activations):
    force(monkeypatch, kernel, bits)
    _, model, inputs = check_int8_gives_the_fake_outputs(
        config(weights={"granularity": weights}, activations={**activations, "bits": bits}))
    with torch.no_grad(), OperatorSpy() as spy:
        model(inputs)
    chosen = kernels.chosen(CPU, bits)
    assert chosen.name == kernel
    assert len(spy.of(chosen)) == 2  # both layers' products ran on it


@pytest.mark.parametrize("activations", QUANTIZED_INPUTS.values(), ids=QUANTIZED_INPUTS.keys())
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_the_float_kernel_is_the_fake_backend_to_the_bit(monkeypatch, weights, activations):
    """The fallback where no int8 kernel is exact: whole models agree with the fake backend, not
    only each layer (a rounding difference in one layer can move the next layer's codes)."""
    monkeypatch.setenv(kernels.OVERRIDE, "float")
    fake, model, inputs = check_int8_gives_the_fake_outputs(config(weights={"granularity": weights}, activations=activations))
    with torch.no_grad():
        assert torch.equal(model(inputs), fake(inputs))


class Saturating(kernels.Int8Kernel):
    """What u8 x s8 kernels compute without VNNI (vpmaddubsw), in torch: each pair of products is
    summed in int16, with saturation, before the int32 sum."""

    name, ops = "saturating", ("aten::clamp",)
    codes_dtype, unsigned = torch.uint8, True

    def pack(self, weight, weight_scale, input_scale, bias, bits):
        scale = weight_scale if input_scale is None else weight_scale * input_scale
        return weight.int(), scale, bias, self.shift(bits)

    def run(self, packed, codes, row_scale):
        weight, scale, bias, shift = packed
        products = codes.int()[:, None, :] * weight[None, :, :]  # (rows, out, in)
        pairs = products.reshape(*products.shape[:2], -1, 2).sum(-1).clamp(-(2**15), 2**15 - 1)
        return kernels.rescale(pairs.sum(-1) - shift * weight.sum(-1), scale, row_scale, bias)


def test_a_kernel_whose_products_saturate_is_never_chosen(monkeypatch):
    monkeypatch.setitem(INT8_KERNELS._entries, Saturating.name, Saturating())
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "BENCHMARK_SHAPE", (16, 64, 16))  # the emulation holds every product

    wide, narrow = kernels.measured(CPU, 8), kernels.measured(CPU, 7)
    verdict = wide.probes[Saturating.name]
    assert verdict.startswith("not exact here") and "saturate in int16" in verdict
    assert Saturating.name not in wide.speed
    assert kernels.chosen(CPU, 8).name != Saturating.name
    # 7-bit codes shifted to u8 stay <= 127: no pair of products reaches the int16 limit
    assert narrow.probes[Saturating.name] == kernels.EXACT

    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setenv(kernels.OVERRIDE, Saturating.name)
    with pytest.raises(UserError) as error:
        kernels.chosen(CPU, 8)
    message = str(error.value)
    assert message.startswith(f"{kernels.OVERRIDE}=saturating cannot run 8-bit codes") and "not exact here" in message
    assert "\n" not in message
    assert kernels.chosen(CPU, 7).name == Saturating.name  # and where it is exact, it may be forced


def test_an_unknown_override_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(kernels.OVERRIDE, "onednnn")
    model = calibrated(mlp(), Int8Quantizer(config()), torch.randn(8, 48))
    with pytest.raises(UserError) as error, torch.no_grad():
        model(torch.randn(5, 48))
    message = str(error.value)
    assert message.startswith(f"{kernels.OVERRIDE}: unknown int8 kernel 'onednnn'") and "\n" not in message
    assert "did you mean onednn" in message and all(name in message for name in INT8_KERNELS.names())


def fake_benchmark(speeds):
    """kernels.benchmark with these fp32-relative speeds in place of timings (exactness stays probed)."""
    return lambda candidates, device, bits: {name: speeds(name, bits) for name in candidates}


def test_a_choice_slower_than_fp32_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_MEASURED", {})
    # 8-bit: every int8 kernel slower than the float fallback, itself slower than fp32;
    # 7-bit: the int8 kernels twice as fast as fp32
    monkeypatch.setattr(kernels, "benchmark", fake_benchmark(
        lambda name, bits: 0.9 if name == "float" else (0.5 if bits == 8 else 2.0)))
    model = calibrated(mlp(), Int8Quantizer(config()), torch.randn(8, 48))
    with caplog.at_level(logging.INFO, logger=kernels.log.name), torch.no_grad():
        model(torch.randn(5, 48))
        model(torch.randn(5, 48))
        copy.deepcopy(model)(torch.randn(5, 48))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    (message,) = warnings
    assert message.startswith("int8 layers run at ~0.90x fp32 speed on this CPU (") and "\n" not in message
    assert "backend fake" in message and "activations bits 7 (exact on " in message and "2.00x fp32)" in message
    assert kernels.describe()["kernel"] == "float"


def test_a_choice_faster_than_fp32_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "benchmark", fake_benchmark(lambda name, bits: 2.5 if name == "float" else 3.0))
    with caplog.at_level(logging.INFO, logger=kernels.log.name):
        kernel = kernels.chosen(CPU, 8)
    assert not [record for record in caplog.records if record.levelno == logging.WARNING]
    (info,) = [record.getMessage() for record in caplog.records]
    speed = "2.50x" if kernel.name == "float" else "3.00x"  # float: where no int8 kernel is exact
    assert info.startswith(f"int8 kernel for 8-bit inputs on cpu: {kernel.name}, {speed} an fp32 linear")


def test_describe_says_which_kernel_runs_and_why():
    description = kernels.describe()
    json.dumps(description)  # it goes into report.json
    assert description["kernel"] in INT8_KERNELS.names()
    assert description["probe"][description["kernel"]] == kernels.EXACT
    assert description["probe"]["float"] == kernels.EXACT
    assert set(description["speed_vs_fp32"]) == {name for name, verdict in description["probe"].items() if verdict == kernels.EXACT}
    assert description["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"vnni", "amx", "threads", "override", "activation_bits"} <= set(description)


def test_the_packed_weight_follows_loads_and_copies():
    data = torch.randn(8, 48)
    model = calibrated(mlp(), Int8Quantizer(config()), data)
    other = calibrated(mlp(), Int8Quantizer(config()), data * 3)  # other input scales
    probe = torch.randn(5, 48)
    with torch.no_grad():
        before = model(probe)  # packs
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(probe), other(probe))
        assert not torch.equal(model(probe), before)
        assert torch.equal(copy.deepcopy(model)(probe), other(probe))


def test_torchao_warns_when_int_mm_is_slow_here(monkeypatch, caplog):
    from quantsink.quantizers.torchao_backend import TorchAOQuantizer

    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "benchmark", fake_benchmark(lambda name, bits: 0.05 if name == "int-mm" else 2.0))
    settings = config(backend="torchao", activations={"granularity": "per_token", "dynamic": True})
    with caplog.at_level(logging.WARNING, logger=kernels.log.name):
        for _ in range(2):
            calibrated(mlp(), TorchAOQuantizer(settings), torch.randn(8, 48))
    (message,) = [record.getMessage() for record in caplog.records]
    if kernels.measured(CPU, 8).probes["int-mm"] == kernels.EXACT:
        assert "int-mm: 0.05x an fp32 linear on this CPU (" in message
    assert message.startswith("torchao's int8 W8A8 runs torch._int_mm on cpu") and "backend int8 runs exact kernels only" in message


def test_the_report_names_the_kernel_the_int8_layers_run_on():
    import quantsink
    from quantsink.testing.tiny import build_tiny

    recipe = {"name": "kernel", "calibration": {"data": "bundled", "num_samples": 2, "batch_size": 2, "holdout": 2},
              "quantization": {"backend": "int8"}}
    report = quantsink.quantize(build_tiny("hf-clip").model, recipe, progress=False).report
    (described,) = report["int8_kernels"]
    assert described == kernels.describe("cpu", 8)
    assert described["kernel"] in INT8_KERNELS and described["probe"][described["kernel"]] == "exact"
    json.dumps(report["int8_kernels"])  # report.json holds it as it is
