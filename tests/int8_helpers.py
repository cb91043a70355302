"""Helpers the int8 backend's tests and the integer exports' tests share: small calibrated
models, the int8-against-fake check, an operator spy, and recipe writing on the bundled data."""
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import quantsink
from quantsink.data import load_samples
from quantsink.quantizers import kernels
from quantsink.quantizers.fake import FakeQuantizer
from quantsink.quantizers.int8 import Int8Linear, Int8Quantizer
from quantsink.recipe import QuantizationConfig

CALIBRATION = {"data": "bundled", "num_samples": 4, "batch_size": 4, "seed": 0, "holdout": 4}
ACTIVATIONS = {
    "static per-tensor": {"granularity": "per_tensor", "dynamic": False},
    "dynamic per-token": {"granularity": "per_token", "dynamic": True},
    "dynamic per-tensor": {"granularity": "per_tensor", "dynamic": True},
    "weight-only": None,
}


def config(**fields) -> QuantizationConfig:
    return QuantizationConfig.model_validate(fields)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40, bias=False))


def calibrated(model: nn.Module, quantizer, data: torch.Tensor) -> nn.Module:
    quantizer.prepare(model)
    with torch.no_grad(), quantizer.calibrating(model):
        model(data)
    quantizer.freeze(model)
    return model


def check_int8_gives_the_fake_outputs(settings: QuantizationConfig) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Checks each int8 layer against its fake one; returns the fake and int8 models and the inputs."""
    data = torch.randn(3, 20, 48)
    fake = calibrated(mlp(), FakeQuantizer(settings), data)
    real = calibrated(mlp(), Int8Quantizer(settings), data)
    assert all(isinstance(real[i], Int8Linear) for i in (0, 2))
    # the same integers and scales as the fake backend's
    for index in (0, 2):
        assert real[index].weight.dtype == torch.int8
        assert torch.equal(real[index].weight.float() * real[index].weight_scale, fake[index].weight)
    probe = torch.randn(2, 33, 48) * 1.5  # beyond the calibrated range too: both clip alike
    inputs = {}
    hooks = [fake[i].register_forward_pre_hook(lambda _, args, i=i: inputs.setdefault(i, args[0])) for i in (0, 2)]
    with torch.no_grad():
        assert real(probe).shape == fake(probe).shape
        # layer by layer, on the same inputs: a float-rounding difference in one layer's output
        # can move an input of the next across a rounding boundary, one code step away
        for index, layer_input in inputs.items():
            expected, got = fake[index](layer_input), real[index](layer_input)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for hook in hooks:
        hook.remove()
    assert not torch.equal(fake(probe), mlp()(probe))  # and it is quantized at all
    return fake, real, probe



class OperatorSpy(TorchDispatchMode):
    """Records every operator that runs (without its overload), with the dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.name().partition(".")[0], [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def of(self, kernel: kernels.Int8Kernel) -> list[list[torch.dtype]]:
        """The argument dtypes of each call of `kernel`'s product operator."""
        return [dtypes for name, dtypes in self.calls if name in kernel.ops]



def write_recipe(folder, quantization, export_format):
    path = folder / "recipe.yaml"
    path.write_text(quantsink.Recipe.from_dict(
        {"name": "t", "calibration": CALIBRATION, "quantization": quantization, "export": {"format": export_format}}
    ).to_yaml())
    return path


def holdout_inputs(adapter):
    samples = load_samples("bundled", adapter.modality, CALIBRATION["num_samples"], CALIBRATION["holdout"], seed=0)
    return adapter.preprocess(samples.calibration), adapter.preprocess(samples.holdout)

