"""The `quanto` backend: optimum-quanto's QLinear, calibrated in its `Calibration` context.

Weights are qint8 per output channel (quanto's absmax); with activations, each Linear's input is
quantized to qint8 with a static per-tensor scale that quanto's `Calibration` sets (absmax of
each batch, averaged with momentum 0.9). quanto would also quantize every Linear's output; that
is switched off, so that A8 means what it means for the other backends: the Linear inputs.

A frozen QLinear's state is already plain tensors (`weight._data`, `weight._scale`,
`input_scale`, `output_scale`): `restore` rebuilds frozen QLinears and the checkpoint loads
into them. optimum-quanto is imported on first use (it takes seconds).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from torch import nn

from quantsink.quantizers.base import Quantizer, replace_module, target_linears, module_to_restore
from quantsink.recipe import QuantizationConfig
from quantsink.registry import QUANTIZERS


def quanto_incompatibility(config: QuantizationConfig) -> Optional[str]:
    """What in `config` quanto's int8 layers cannot run (field path first), or None."""
    weights, activations = config.weights, config.activations
    if weights is None:
        return "quantization.weights is null, quanto quantizes weights"
    if weights.bits != 8 or not weights.symmetric or weights.granularity != "per_channel":
        return "quantization.weights must be 8-bit, symmetric, per_channel for quanto's qint8 weights"
    if weights.observer != "minmax":
        return f"quantization.weights.observer is {weights.observer}, quanto picks weight scales by absmax (minmax)"
    if activations is None:
        return None
    if activations.bits != 8 or not activations.symmetric or activations.dynamic or activations.granularity != "per_tensor":
        return "quantization.activations must be 8-bit, symmetric, static per_tensor (or null) for quanto's qint8 inputs"
    if activations.observer != "minmax":
        return f"quantization.activations.observer is {activations.observer}, quanto calibrates inputs by absmax (minmax)"
    return None


@QUANTIZERS.register("quanto")
class QuantoQuantizer(Quantizer):
    incompatibility = staticmethod(quanto_incompatibility)
    merges_input_statistics = False  # quanto's Calibration keeps a running average of its own

    def quantized_linear(self, linear: nn.Linear) -> nn.Module:
        from optimum.quanto import qint8
        from optimum.quanto.nn import quantize_module

        module = quantize_module(linear, weights=qint8, activations=qint8 if self.config.activations else None)
        module.disable_output_quantization()
        return module

    def prepare(self, model: nn.Module) -> list[str]:
        targets = target_linears(model, self.config)
        for name, linear in targets.items():
            replace_module(model, name, self.quantized_linear(linear))
        return list(targets)

    @contextlib.contextmanager
    def calibrating(self, model: nn.Module) -> Iterator[None]:
        from optimum.quanto import Calibration

        # streamline only decides which outputs to quantize, and none are
        with Calibration(streamline=False):
            yield

    def qlinears(self, model: nn.Module) -> dict[str, nn.Module]:
        from optimum.quanto.nn import QLinear

        return {name: module for name, module in model.named_modules() if isinstance(module, QLinear)}

    def freeze(self, model: nn.Module) -> None:
        for module in self.qlinears(model).values():
            module.freeze()

    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"modules": sorted(self.qlinears(model))}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        for name in state["modules"]:
            linear = module_to_restore(model, name)
            module = self.quantized_linear(linear)
            module.freeze()  # its state now has the frozen layout the checkpoint fills
            replace_module(model, name, module)
