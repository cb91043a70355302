"""The `torchao` backend: torchao's int8 workflows applied with `quantize_`.

- dynamic inputs (per token or per tensor): `Int8DynamicActivationInt8WeightConfig`;
- static per-tensor inputs: `Int8StaticActivationInt8WeightConfig`, its scale calibrated by the
  recipe's observer exactly as the `fake` backend calibrates `input_scale`;
- `activations: null`: `Int8WeightOnlyConfig`.

torchao picks its own weight scales (symmetric min-max on [-128, 127]) and stores weights as
`Int8Tensor` subclasses. safetensors holds plain tensors only, so each quantized Linear saves the
subclass's inner tensors (`weight.qdata`, `weight.scale`, ...) and loads them back into the
subclass that `restore` rebuilt with the same config: nothing is re-quantized on load.

torchao is imported on first use: importing it takes seconds (and warns, with this torch).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from quantsink.quantizers import kernels
from quantsink.quantizers.base import Quantizer, target_linears, module_to_restore
from quantsink.quantizers.functional import qparams_from_range
from quantsink.recipe import QuantizationConfig
from quantsink.registry import OBSERVERS, QUANTIZERS


def torchao_incompatibility(config: QuantizationConfig) -> Optional[str]:
    """What in `config` torchao's int8 workflows cannot run (field path first), or None."""
    weights, activations = config.weights, config.activations
    if weights is None:
        return "quantization.weights is null, torchao's int8 workflows quantize weights"
    if weights.bits != 8 or not weights.symmetric or weights.granularity == "per_group":
        return "quantization.weights must be 8-bit, symmetric, per_channel or per_tensor for torchao's int8 workflows"
    if weights.observer != "minmax":
        return f"quantization.weights.observer is {weights.observer}, torchao picks weight scales by min-max"
    if activations is not None and activations.bits != 8:
        return f"quantization.activations.bits is {activations.bits}, torchao's int8 workflows run 8 (or null: weight-only)"
    if activations is not None and not activations.dynamic and not activations.symmetric:
        return "quantization.activations.symmetric is false, torchao's static int8 workflow takes symmetric inputs"
    return None


def _granularity(name: str):
    from torchao.quantization import PerRow, PerTensor

    return PerTensor() if name == "per_tensor" else PerRow()


class InputObserver:
    """A forward pre-hook feeding the recipe's observer, as FakeQuantLinear observes its input;
    also remembers the input's rank (torchao's static scale must have the same)."""

    def __init__(self, config: QuantizationConfig):
        args = config.activations
        self.observer = OBSERVERS.get(args.observer)(args.bits, args.symmetric)
        self.rank: Optional[int] = None

    def __call__(self, _module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.observer.observe(inputs[0].reshape(1, -1))
        self.rank = inputs[0].dim()


@QUANTIZERS.register("torchao")
class TorchAOQuantizer(Quantizer):
    incompatibility = staticmethod(torchao_incompatibility)

    def __init__(self, config: QuantizationConfig):
        super().__init__(config)
        self.targets: dict[str, nn.Linear] = {}
        self.observers: dict[str, InputObserver] = {}

    @property
    def static(self) -> bool:
        return self.config.activations is not None and not self.config.activations.dynamic

    def prepare(self, model: nn.Module) -> list[str]:
        self.targets = target_linears(model, self.config)
        return list(self.targets)

    @contextlib.contextmanager
    def calibrating(self, model: nn.Module) -> Iterator[None]:
        if not self.static:
            yield
            return
        self.observers = {name: InputObserver(self.config) for name in self.targets}
        handles = [linear.register_forward_pre_hook(self.observers[name]) for name, linear in self.targets.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def workflow(self, input_scale: Optional[torch.Tensor] = None):
        """The torchao config for the recipe (set_inductor_config=False: no global side effect)."""
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8StaticActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            MappingType,
        )

        weights, activations = self.config.weights, self.config.activations
        if activations is None:
            return Int8WeightOnlyConfig(granularity=_granularity(weights.granularity), set_inductor_config=False)
        granularity = [_granularity(activations.granularity), _granularity(weights.granularity)]
        if activations.dynamic:
            mapping = MappingType.SYMMETRIC if activations.symmetric else MappingType.ASYMMETRIC
            return Int8DynamicActivationInt8WeightConfig(
                granularity=granularity, act_mapping_type=mapping, set_inductor_config=False
            )
        return Int8StaticActivationInt8WeightConfig(
            act_quant_scale=input_scale, granularity=granularity, set_inductor_config=False
        )

    def input_observers(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        return {name: self.observers[name].observer for name in names if name in self.observers}

    def input_scale(self, name: str) -> torch.Tensor:
        observer = self.observers.get(name)
        if observer is None or observer.rank is None:
            raise RuntimeError(f"{name} saw no calibration data: the calibration pass never reached it")
        scale, _ = qparams_from_range(*observer.observer.range(), 8, symmetric=True)
        return scale.reshape((1,) * observer.rank)

    def freeze(self, model: nn.Module) -> None:
        for name, linear in self.targets.items():
            scale = self.input_scale(name).to(linear.weight.device) if self.static else None
            apply_workflow(linear, self.workflow(scale))
        self.observers = {}
        self.check_int_mm()

    def state(self, model: nn.Module) -> dict[str, Any]:
        """Per module, the rank of its static input scale (None: dynamic or weight-only)."""
        ranks = {}
        for name, linear in self.targets.items():
            scale = getattr(linear.weight, "act_quant_scale", None)
            ranks[name] = None if scale is None else scale.dim()
        return {"modules": ranks}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        for name, rank in state["modules"].items():
            linear = module_to_restore(model, name)
            # placeholder scale of the saved rank; loading the checkpoint overwrites it
            scale = torch.ones((1,) * rank, device=linear.weight.device) if rank is not None else None
            apply_workflow(linear, self.workflow(scale))
            self.targets[name] = linear
        self.check_int_mm()

    def check_int_mm(self) -> None:
        """torchao multiplies int8 inputs with torch._int_mm, which is slow (or inexact) on some
        CPUs: the int8 backend's measurement says so, once."""
        if self.config.activations is not None:
            for device in {linear.weight.device for linear in self.targets.values()}:
                kernels.warn_about_int_mm(device)


def apply_workflow(linear: nn.Linear, workflow: Any) -> None:
    """`quantize_` one Linear; its tensor-subclass weight is then saved as its inner tensors
    (`weight.<name>`) and loaded back into the subclass the module already holds, so that
    checkpoints are plain safetensors."""
    from torchao.quantization import quantize_

    quantize_(linear, workflow)
    linear.register_state_dict_post_hook(_flatten_weight)
    linear.register_load_state_dict_pre_hook(_unflatten_weight)


def _flatten_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, _local_metadata: Any) -> None:
    weight = state_dict.pop(prefix + "weight")
    names, _ = weight.__tensor_flatten__()
    for name in names:
        state_dict[f"{prefix}weight.{name}"] = getattr(weight, name)


def _unflatten_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    names, context = module.weight.__tensor_flatten__()
    keys = {name: f"{prefix}weight.{name}" for name in names}
    if all(key in state_dict for key in keys.values()):
        inner = {name: state_dict.pop(key) for name, key in keys.items()}
        weight = module.weight
        state_dict[prefix + "weight"] = type(weight).__tensor_unflatten__(inner, context, weight.size(), weight.stride())
