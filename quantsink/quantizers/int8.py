"""The `int8` backend: Linear layers that really run in int8.

Weights are int8 per output channel (or per tensor), symmetric; inputs are int8 with one static
scale calibrated like the `fake` backend's, or dynamic scales per token (or per tensor). The
product runs as int8 x int8 -> int32 (`torch._int_mm`) and is rescaled once by
input_scale * weight_scale. The integers and scales are the `fake` backend's own: calibration
is FakeQuantLinear's, and `freeze` converts the calibrated modules, so both backends give the
same outputs up to float rounding (the int8 sum is exact, the fake one is rounded per term).

Settings int8 cannot run (other bit widths, asymmetric ranges, weight groups) are refused when
the quantizer is constructed, before calibration starts.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from quantsink.quantizers.base import replace_module
from quantsink.quantizers.fake import FakeQuantizer, FakeQuantLinear, weight_qparams_shape, weight_rows
from quantsink.quantizers.functional import qparams_from_range, qrange, quantize
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs
from quantsink.registry import QUANTIZERS

BITS = 8

# cuBLAS's int8 GEMM behind torch._int_mm takes more than 16 rows and K, N multiples of 8;
# the CPU kernel takes any shape.
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8


def int8_incompatibility(config: QuantizationConfig) -> Optional[str]:
    """What in `config` int8 layers cannot run (field path first), or None."""
    weights, activations = config.weights, config.activations
    if weights is None:
        return "quantization.weights is null, int8 layers need 8-bit weights"
    if weights.bits != BITS:
        return f"quantization.weights.bits is {weights.bits}, int8 layers run 8 only"
    if not weights.symmetric:
        return "quantization.weights.symmetric is false, int8 layers need symmetric weights"
    if weights.granularity == "per_group":
        return "quantization.weights.granularity is per_group, int8 layers take per_channel or per_tensor"
    if activations is not None and activations.bits != BITS:
        return f"quantization.activations.bits is {activations.bits}, int8 layers run 8 (or null: weight-only)"
    if activations is not None and not activations.symmetric:
        return "quantization.activations.symmetric is false, int8 layers need symmetric activations"
    return None


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exactly, whatever the shape."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if a.device.type == "cuda" and a.shape[1] % CUDA_MULTIPLE == 0 and b.shape[1] % CUDA_MULTIPLE == 0:
        rows = a.shape[0]
        if rows < CUDA_MIN_ROWS:  # zero rows add nothing to the others
            a = torch.cat([a, a.new_zeros(CUDA_MIN_ROWS - rows, a.shape[1])])
        return torch._int_mm(a, b)[:rows]
    # float64 holds every int32 sum of int8 products exactly up to K = 2**53 / 127**2
    return (a.double() @ b.double()).to(torch.int32)


class Int8Linear(nn.Module):
    """y = (q_x @ q_w^T) * (input_scale * weight_scale) + bias, with q_x and q_w int8.

    State: `weight` (int8, out x in), `weight_scale` ((out, 1) or (1,)), `input_scale` ((1,),
    static inputs only), `bias`: the names and shapes compressed-tensors gives a W8A8 layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: WeightArgs,
        activations: Optional[ActivationArgs],
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.activation_args = weights, activations
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(weight_qparams_shape(self.weight, weights)))
        if activations is not None and not activations.dynamic:
            self.register_buffer("input_scale", torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_fake(cls, fake: FakeQuantLinear) -> "Int8Linear":
        """The int8 module of a frozen FakeQuantLinear: same integers, same scales."""
        module = cls(fake.in_features, fake.out_features, fake.bias is not None, fake.weight_args, fake.activation_args)
        module.to(fake.weight.device)
        module.weight.copy_(grid_weight(fake))
        module.weight_scale.copy_(fake.weight_scale)
        if hasattr(module, "input_scale"):
            module.input_scale.copy_(fake.input_scale)
        if fake.bias is not None:
            module.bias.copy_(fake.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        weight_scale = self.weight_scale.reshape(1, -1).float()
        if self.activation_args is None:
            out = rows.float() @ self.weight.t().float()
        else:
            q, input_scale = self.quantize_input(rows)
            out = int8_matmul(q, self.weight.t()).float()
            # float32 scales (an int32 sum times a bf16 scale would round to bf16 first), applied
            # in place and with the bias: the output is the largest tensor the layer touches,
            # and on CPU every extra pass over it eats into what the int8 product saved
            if input_scale.shape[0] == 1:
                weight_scale = input_scale.float() * weight_scale
            else:
                out.mul_(input_scale.float())
        if self.bias is None:
            out.mul_(weight_scale)
        else:
            torch.addcmul(self.bias.float(), out, weight_scale, out=out)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 rows and their scale ((1, 1) or (rows, 1)), rounded as FakeQuantLinear.quantize_input rounds them."""
        args = self.activation_args
        if not args.dynamic:
            return quantize_symmetric_int8(rows, self.input_scale.reshape(1, 1)), self.input_scale.reshape(1, 1)
        # amin and amax rather than aminmax: the fused reduction is far slower on CPU
        if args.granularity == "per_token":
            lo, hi = rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
        else:
            lo, hi = rows.min().reshape(1, 1), rows.max().reshape(1, 1)
        scale, _ = qparams_from_range(lo, hi, BITS, symmetric=True)
        # a range's own scale maps it inside [-127, 127]: nothing to clamp
        return torch.div(rows, scale).round_().to(torch.int8), scale

    def extra_repr(self) -> str:
        inputs = "a-fp" if self.activation_args is None else f"a8-{'dynamic' if self.activation_args.dynamic else 'static'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, w8{inputs}"


def quantize_symmetric_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`functional.quantize(x, scale, 0, 8, symmetric=True)` as int8, computed in place: the
    same rounding and clamping in two passes fewer over the activations."""
    qmin, qmax = qrange(BITS, symmetric=True)
    return torch.div(x, scale).round_().clamp_(qmin, qmax).to(torch.int8)


def grid_weight(fake: FakeQuantLinear) -> torch.Tensor:
    """A frozen FakeQuantLinear's weight as the integers of its grid (int32, weight's shape)."""
    args = fake.weight_args
    rows = weight_rows(fake.weight, args)
    scale = fake.weight_scale.reshape(rows.shape[0], 1)
    zero_point = fake.weight_zero_point.reshape(rows.shape[0], 1)
    return quantize(rows, scale, zero_point, args.bits, args.symmetric).reshape(fake.weight.shape).to(torch.int32)


@QUANTIZERS.register("int8")
class Int8Quantizer(FakeQuantizer):
    """Calibrates through FakeQuantLinear (same observers), then converts to Int8Linear."""

    incompatibility = staticmethod(int8_incompatibility)

    def freeze(self, model: nn.Module) -> None:
        super().freeze(model)
        for name, module in self.quantized_modules(model).items():
            replace_module(model, name, Int8Linear.from_fake(module))

    def int8_modules(self, model: nn.Module) -> dict[str, Int8Linear]:
        return {name: module for name, module in model.named_modules() if isinstance(module, Int8Linear)}

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"modules": sorted(self.int8_modules(model))}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        super().restore(model, state)  # checks the names, and its modules know the shapes
        for name, fake in self.quantized_modules(model).items():
            module = Int8Linear(fake.in_features, fake.out_features, fake.bias is not None,
                                self.config.weights, self.config.activations)
            replace_module(model, name, module.to(fake.weight.device))


def int8_export(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state with every frozen FakeQuantLinear converted to Int8Linear, and the
    int8 quantizer state that restores it."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            for key in module.state_dict():
                del state[f"{name}.{key}"]
            state.update({f"{name}.{key}": value for key, value in Int8Linear.from_fake(module).state_dict().items()})
    modules = sorted(name for name, module in model.named_modules() if isinstance(module, (FakeQuantLinear, Int8Linear)))
    return state, {"modules": modules}
