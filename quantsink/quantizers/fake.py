"""The `fake` backend: simulated (quantize-dequantize) weights and Linear inputs in float.

Weights are stored already fake-quantized, beside their scales and zero points, so a saved
model reproduces the in-memory one exactly and other exporters can re-pack the integers."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from quantsink.errors import UserError
from quantsink.quantizers.base import (QuantizedLinear, QuantizedLinears, Quantizer, module_to_restore, replace_module,
                                       target_linears)
from quantsink.quantizers.functional import dequantize, fake_quantize, fake_quantize_along, qparams_from_range, quantize
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs
from quantsink.registry import OBSERVERS, QUANTIZERS


def weight_rows(weight: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """The weight as (groups, values-per-group) for the recipe's granularity."""
    if args.granularity == "per_channel":
        return weight.reshape(weight.shape[0], -1)
    if args.granularity == "per_tensor":
        return weight.reshape(1, -1)
    return weight.reshape(-1, args.group_size)


def weight_qparams_shape(weight: torch.Tensor, args: WeightArgs) -> tuple[int, ...]:
    if args.granularity == "per_channel":
        return (weight.shape[0], 1)
    if args.granularity == "per_tensor":
        return (1,)
    return (weight.shape[0], weight.shape[1] // args.group_size)


class FakeQuantLinear(nn.Module):
    """A Linear whose weight and input are quantize-dequantized. While `calibrating` it runs in
    full precision and feeds its input observer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: Optional[WeightArgs],
        activations: Optional[ActivationArgs],
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.activation_args = weights, activations
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        if weights is not None:
            if weights.granularity == "per_group" and in_features % weights.group_size:
                raise UserError(
                    f"quantization.weights.group_size {weights.group_size} does not divide in_features "
                    f"{in_features}: pick a divisor or per_channel"
                )
            shape = weight_qparams_shape(self.weight, weights)
            self.register_buffer("weight_scale", torch.ones(shape))
            self.register_buffer("weight_zero_point", torch.zeros(shape))
        if self.quantizes_static_input:
            self.register_buffer("input_scale", torch.ones(1))
            self.register_buffer("input_zero_point", torch.zeros(1))
        self.input_observer = None
        self.calibrating = False

    @property
    def quantizes_static_input(self) -> bool:
        return self.activation_args is not None and not self.activation_args.dynamic

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantizationConfig) -> "FakeQuantLinear":
        # built where the weight is (the meta device for a block streamed from disk: no memory)
        with torch.device(linear.weight.device):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, config.weights, config.activations)
        # the Linear's own storage, not a copy: freeze gives the module new tensors and leaves it alone
        module.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if module.quantizes_static_input:
            args = config.activations
            module.input_observer = OBSERVERS.get(args.observer)(args.bits, args.symmetric)
        module.calibrating = True
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.input_observer is not None:
                self.input_observer.observe(x.reshape(1, -1))
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        args = self.activation_args
        if args is None:
            return x
        if not args.dynamic:
            return fake_quantize(x, self.input_scale, self.input_zero_point, args.bits, args.symmetric)
        return fake_quantize_along(x, -1 if args.granularity == "per_token" else None, args.bits, args.symmetric)

    @torch.no_grad()
    def freeze(self) -> None:
        if self.weight_args is not None:
            args = self.weight_args
            rows = weight_rows(self.weight, args)
            observer = OBSERVERS.get(args.observer)(args.bits, args.symmetric)
            observer.observe(rows)
            scale, zero_point = qparams_from_range(*observer.range(), args.bits, args.symmetric)
            quantized = fake_quantize(rows, scale[:, None], zero_point[:, None], args.bits, args.symmetric)
            self.weight.data = quantized.reshape(self.weight.shape)
            self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
            self.weight_zero_point.copy_(zero_point.reshape(self.weight_zero_point.shape))
        if self.input_observer is not None:
            args = self.activation_args
            scale, zero_point = qparams_from_range(*self.input_observer.range(), args.bits, args.symmetric)
            self.input_scale.copy_(scale)
            self.input_zero_point.copy_(zero_point)
        self.input_observer = None
        self.calibrating = False

    def extra_repr(self) -> str:
        weights = f"w{self.weight_args.bits}" if self.weight_args else "w-fp"
        inputs = f"a{self.activation_args.bits}" if self.activation_args else "a-fp"
        return f"in_features={self.in_features}, out_features={self.out_features}, {weights}{inputs}"


def grid_weight(fake: FakeQuantLinear) -> torch.Tensor:
    """A frozen FakeQuantLinear's weight as the integers of its grid (int32, weight's shape)."""
    args = fake.weight_args
    rows = weight_rows(fake.weight, args)
    scale = fake.weight_scale.reshape(rows.shape[0], 1)
    zero_point = fake.weight_zero_point.reshape(rows.shape[0], 1)
    return quantize(rows, scale, zero_point, args.bits, args.symmetric).reshape(fake.weight.shape).to(torch.int32)


@QUANTIZERS.register("fake")
class FakeQuantizer(Quantizer):
    module_class = FakeQuantLinear
    integer_layers = True
    freezes_by_block = True

    def prepare(self, model: nn.Module) -> list[str]:
        targets = target_linears(model, self.config)
        for name, linear in targets.items():
            replace_module(model, name, self.module_class.from_linear(linear, self.config))
        return list(targets)

    def input_observers(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        modules = {name: model.get_submodule(name) for name in names}
        return {name: module.input_observer for name, module in modules.items() if module.input_observer is not None}

    def quantized_modules(self, model: nn.Module) -> dict[str, FakeQuantLinear]:
        return {name: module for name, module in model.named_modules() if isinstance(module, self.module_class)}

    def freeze(self, model: nn.Module) -> None:
        for module in self.quantized_modules(model).values():
            if module.calibrating:  # a block frozen on its own earlier stays as it was
                module.freeze()

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"modules": sorted(self.quantized_modules(model))}

    def quantized_linears(self, model: nn.Module) -> QuantizedLinears:
        if self.config.weights is None:
            raise UserError("quantization.weights is null, so the layers hold no integers to export: use export.format fake-quant")
        return QuantizedLinears(self.quantized_modules(model), lambda module: QuantizedLinear(
            weight=grid_weight(module), weight_scale=module.weight_scale, weight_zero_point=module.weight_zero_point,
            input_scale=module.input_scale if module.quantizes_static_input else None,
            input_zero_point=module.input_zero_point if module.quantizes_static_input else None,
            bias=module.bias, weight_args=module.weight_args, activation_args=module.activation_args,
        ))

    def linear_state(self, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The weight dequantized exactly as `freeze` left it, beside its integers' scales."""
        scale = linear.weight_scale
        rows = weight_rows(linear.weight.to(scale.dtype), linear.weight_args)
        groups = rows.shape[0]
        weight = dequantize(rows, scale.reshape(groups, 1), linear.weight_zero_point.to(scale.dtype).reshape(groups, 1))
        state = {"weight": weight.reshape(linear.weight.shape), "weight_scale": scale,
                 "weight_zero_point": linear.weight_zero_point.to(scale.dtype)}
        if linear.input_scale is not None:
            state["input_scale"] = linear.input_scale
            state["input_zero_point"] = linear.input_zero_point.to(linear.input_scale.dtype)
        if linear.bias is not None:
            state["bias"] = linear.bias
        return state

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        for name in state["modules"]:
            linear = module_to_restore(model, name)
            module = self.module_class(linear.in_features, linear.out_features, linear.bias is not None,
                                       self.config.weights, self.config.activations)
            replace_module(model, name, module.to(linear.weight.device))
