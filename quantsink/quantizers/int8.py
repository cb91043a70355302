"""The `int8` backend: Linear layers that really run in int8.

Weights are int8 per output channel (or per tensor), symmetric; inputs are 8-bit (or 7-bit)
integer codes with one static scale calibrated like the `fake` backend's, or dynamic scales per
token (or per tensor). The product runs on the int8 kernel `kernels.chosen` measured fastest
among those exact on this machine (int8 x int8 -> int32, rescaled once by input_scale *
weight_scale). The integers and scales are the `fake` backend's own: calibration is
FakeQuantLinear's, and `freeze` converts the calibrated modules, so both backends give the
same outputs up to float rounding (the integer sum is exact, the fake one is rounded per term).

7-bit inputs are for CPUs without VNNI, where the fast uint8 kernels are exact for 7-bit codes
only (see kernels.py). Settings int8 cannot run (other bit widths, asymmetric ranges, weight
groups) are refused when the quantizer is constructed, before calibration starts.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from quantsink.quantizers import kernels
from quantsink.quantizers.base import QuantizedLinear, QuantizedLinears, replace_module
from quantsink.quantizers.fake import FakeQuantizer, FakeQuantLinear, grid_weight, weight_qparams_shape
from quantsink.quantizers.functional import qparams_from_range
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs
from quantsink.registry import QUANTIZERS

BITS = 8
INPUT_BITS = (8, 7)


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
    if activations is not None and activations.bits not in INPUT_BITS:
        return (f"quantization.activations.bits is {activations.bits}, int8 layers run 8 or 7 "
                "(or null: weight-only)")
    if activations is not None and not activations.symmetric:
        return "quantization.activations.symmetric is false, int8 layers need symmetric activations"
    return None


class Int8Linear(nn.Module):
    """y = (q_x @ q_w^T) * (input_scale * weight_scale) + bias, with q_x and q_w integers.

    State: `weight` (int8, out x in), `weight_scale` ((out, 1) or (1,)), `input_scale` ((1,),
    static inputs only), `bias`: the names and shapes compressed-tensors gives a W8A8 layer.
    The chosen kernel's packed weight is derived from them on first use, and again whenever one
    of them changes (a load, a move): it is never saved."""

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
        self._packed: Optional[tuple[tuple, kernels.Int8Kernel, Any]] = None

    @classmethod
    @torch.no_grad()
    def from_fake(cls, fake: FakeQuantLinear) -> "Int8Linear":
        """The int8 module of a frozen FakeQuantLinear: same integers, same scales."""
        with torch.device(fake.weight.device):
            module = cls(fake.in_features, fake.out_features, fake.bias is not None, fake.weight_args, fake.activation_args)
        module.weight.copy_(grid_weight(fake))
        module.weight_scale.copy_(fake.weight_scale)
        if hasattr(module, "input_scale"):
            module.input_scale.copy_(fake.input_scale)
        if fake.bias is not None:
            module.bias.copy_(fake.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.activation_args is None:
            bias = None if self.bias is None else self.bias.float()
            out = kernels.rescale(rows.float() @ self.weight.t().float(), self.weight_scale.reshape(1, -1).float(), None, bias)
        else:
            kernel, packed = self.packed(rows.device)
            codes, row_scale = self.quantize_input(rows, kernel)
            out = kernel.run(packed, codes, row_scale)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, rows: torch.Tensor, kernel: kernels.Int8Kernel) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The rows' codes as `kernel` takes them, rounded as FakeQuantLinear.quantize_input rounds
        them, and their dynamic scale ((1, 1) or (rows, 1); None for a static scale, which the
        packed weight holds)."""
        args = self.activation_args
        if not args.dynamic:
            return kernels.to_codes(rows, self.input_scale.reshape(1, 1), args.bits, kernel), None
        # amin and amax rather than aminmax: the fused reduction is far slower on CPU
        if args.granularity == "per_token":
            lo, hi = rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
        else:
            lo, hi = rows.min().reshape(1, 1), rows.max().reshape(1, 1)
        scale, _ = qparams_from_range(lo, hi, args.bits, symmetric=True)
        # a range's own scale maps it inside the code range: nothing to clamp
        return kernels.to_codes(rows, scale, args.bits, kernel, clamp=False), scale.float()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float: its codes times their scales."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1).float()

    def packed(self, device: torch.device) -> tuple[kernels.Int8Kernel, Any]:
        """The chosen kernel and this layer's weight packed for it, packed again when the kernel
        or any state tensor changed (identity and in-place version)."""
        kernel = kernels.chosen(device, self.activation_args.bits)
        state = (self.weight, self.weight_scale, getattr(self, "input_scale", None), self.bias)
        key = (kernel.name, *(stamp(tensor) for tensor in state if tensor is not None))
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                weight_scale = self.weight_scale.reshape(-1).float().expand(self.out_features).contiguous()
                input_scale = self.input_scale.float() if hasattr(self, "input_scale") else None
                bias = None if self.bias is None else self.bias.float()
                packed = kernel.pack(self.weight, weight_scale, input_scale, bias, self.activation_args.bits)
            self._packed = (key, kernel, packed)
        return kernel, self._packed[2]

    def __getstate__(self) -> dict[str, Any]:
        # packed weights are derived, and some (oneDNN's) cannot be copied: copies pack anew
        return {**super().__getstate__(), "_packed": None}

    def extra_repr(self) -> str:
        args = self.activation_args
        inputs = "a-fp" if args is None else f"a{args.bits}-{'dynamic' if args.dynamic else 'static'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, w8{inputs}"


def stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """What changes when a tensor is replaced or written in place (inference tensors keep no
    version: they are never written outside inference mode)."""
    return tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version


@QUANTIZERS.register("int8")
class Int8Quantizer(FakeQuantizer):
    """Calibrates through FakeQuantLinear (same observers), then converts to Int8Linear."""

    incompatibility = staticmethod(int8_incompatibility)
    freezes_by_block = True

    def freeze(self, model: nn.Module) -> None:
        super().freeze(model)
        for name, module in self.quantized_modules(model).items():
            replace_module(model, name, Int8Linear.from_fake(module))

    def runtime(self, model: nn.Module) -> dict[str, Any]:
        devices = {module.weight.device for module in self.int8_modules(model).values()}
        if self.config.activations is None:  # weight-only layers multiply in float: no kernel to choose
            return {}
        return {"int8_kernels": [kernels.describe(device, self.config.activations.bits) for device in sorted(devices, key=str)]}

    def int8_modules(self, model: nn.Module) -> dict[str, Int8Linear]:
        return {name: module for name, module in model.named_modules() if isinstance(module, Int8Linear)}

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"modules": sorted(self.int8_modules(model))}

    def quantized_linears(self, model: nn.Module) -> QuantizedLinears:
        return QuantizedLinears(self.int8_modules(model), self._view)

    @staticmethod
    def _view(module: Int8Linear) -> QuantizedLinear:
        static = getattr(module, "input_scale", None)
        return QuantizedLinear(  # the module's own int8 codes: nothing is copied
            weight=module.weight, weight_scale=module.weight_scale, weight_zero_point=torch.zeros_like(module.weight_scale),
            input_scale=static, input_zero_point=None if static is None else torch.zeros_like(static),
            bias=module.bias, weight_args=module.weight_args, activation_args=module.activation_args,
        )

    def linear_state(self, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        state = {"weight": linear.weight.to(torch.int8), "weight_scale": linear.weight_scale}
        if linear.input_scale is not None:
            state["input_scale"] = linear.input_scale
        if linear.bias is not None:
            state["bias"] = linear.bias
        return state

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        super().restore(model, state)  # checks the names, and its modules know the shapes
        for name, fake in self.quantized_modules(model).items():
            module = Int8Linear(fake.in_features, fake.out_features, fake.bias is not None,
                                self.config.weights, self.config.activations)
            replace_module(model, name, module.to(fake.weight.device))
