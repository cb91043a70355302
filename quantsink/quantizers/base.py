"""What every quantization backend shares: which Linear modules a recipe targets, and the
prepare -> calibrate -> freeze lifecycle. Backends know Linear layers and scales, never a
method or a model family."""
from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import nn

from quantsink.errors import CheckpointError, UserError
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """llm-compressor's convention: a class name (of the module or a base class), or
    're:<regex>' matched with re.match against the module's qualified name."""
    class_names = {cls.__name__ for cls in type(module).__mro__}
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in class_names:
            return True
    return False


def target_linears(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Linear]:
    """The Linear modules the recipe asks for, in model order.

    Linears owned by nn.MultiheadAttention are left out: it reads their weights directly and
    never calls them, so replacing them would silently do nothing."""
    skipped = {
        id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention) for child in module.children()
    }
    chosen = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) not in skipped
        and matches(name, module, config.targets)
        and not matches(name, module, config.ignore)
    }
    if not chosen:
        raise UserError(
            f"quantization.targets {config.targets} (minus ignore {config.ignore}) match no Linear module: "
            "use a class name such as Linear or a 're:<regex>' on module names"
        )
    return chosen


def module_to_restore(model: nn.Module, qualified_name: str) -> nn.Module:
    """The module a checkpoint says was quantized, or a CheckpointError when the model lacks it."""
    try:
        return model.get_submodule(qualified_name)
    except AttributeError:
        raise CheckpointError(
            f"the checkpoint quantizes module {qualified_name!r}, which the model lacks: re-export it"
        ) from None


def replace_module(model: nn.Module, qualified_name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, replacement)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a targeted Linear multiplies by, in float, whichever backend holds it: an int8
    layer's codes times its scales; torchao's and quanto's weight subclasses dequantize
    themselves; a float weight (fake-quantized, or not quantized yet) is itself."""
    own = getattr(module, "dequantized_weight", None)
    if callable(own):
        return own()
    weight = module.weight
    return weight if type(weight) in (torch.Tensor, nn.Parameter) else weight.dequantize()


def observing_inputs(module: nn.Module) -> bool:
    """Whether a targeted Linear is still being calibrated, so what enters it feeds its input
    observer (fake and int8 before `freeze`: a FakeQuantLinear calibrating; quanto: a QLinear
    not frozen; torchao: a plain Linear, whose weight `freeze` swaps for a subclass)."""
    if hasattr(module, "calibrating"):
        return bool(module.calibrating)
    if hasattr(module, "frozen"):
        return not module.frozen
    return type(module) is nn.Linear and type(module.weight) is nn.Parameter


@dataclass
class QuantizedLinear:
    """A frozen quantized Linear as integers and scales, whichever backend holds it: what the
    exports read and write, so that none of them knows a backend's module class.

    `weight` holds the integer codes (int8 or int32, the weight's shape) on quantsink's grid:
    [-(2^(b-1) - 1), 2^(b-1) - 1] when symmetric, [0, 2^b - 1] otherwise; `weight_scale` and
    `weight_zero_point` have the shape `weight_args.granularity` gives (zeros when symmetric).
    `input_scale` and `input_zero_point` exist for static inputs only."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    input_scale: Optional[torch.Tensor]
    input_zero_point: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    weight_args: WeightArgs
    activation_args: Optional[ActivationArgs]


class QuantizedLinears(Mapping[str, QuantizedLinear]):
    """Every frozen quantized Linear of a model by name, each view built when it is read: an
    export walks them one layer at a time, so it never holds more than one layer's integer codes
    beyond what it writes (a backend keeping float weights computes them per layer)."""

    def __init__(self, modules: dict[str, nn.Module], view: Callable[[nn.Module], QuantizedLinear]):
        self._modules, self._view = modules, view

    def __getitem__(self, name: str) -> QuantizedLinear:
        return self._view(self._modules[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class Quantizer(ABC):
    """A backend. Lifecycle: `prepare` swaps the targets for observing modules, the model runs
    on calibration data inside `calibrating`, `freeze` fixes the scales. `state` records what
    `restore` needs to rebuild frozen modules on a fresh model before loading a checkpoint.

    A backend whose frozen layers are integers and scales sets `integer_layers` and offers them
    as `QuantizedLinear`s, which exports re-pack; the others' layers are saved as they hold them."""

    integer_layers: ClassVar[bool] = False
    # whether `freeze(block)` quantizes one block of the model, the rest left calibrating: how a
    # model whose weights stream from disk is quantized (quantsink.models.streaming)
    freezes_by_block: ClassVar[bool] = False
    # whether `input_observers` gives what sets the static input scales, so that data-parallel
    # calibration can merge it across ranks exactly (quantsink.distributed)
    merges_input_statistics: ClassVar[bool] = True

    def __init__(self, config: QuantizationConfig):
        problem = self.incompatibility(config)
        if problem is not None:
            raise UserError(f"{problem}: change it or use backend fake")
        self.config = config

    @staticmethod
    def incompatibility(config: QuantizationConfig) -> Optional[str]:
        """Why this backend cannot run `config` (naming the recipe field), or None."""
        return None

    @abstractmethod
    def prepare(self, model: nn.Module) -> list[str]:
        """Swap the targeted modules; returns their names."""

    @contextlib.contextmanager
    def calibrating(self, model: nn.Module) -> Iterator[None]:
        yield

    def input_observers(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        """While calibrating: the observers (quantsink.observers) that will set the static input
        scales of the targets `names`, by name ({} when inputs are dynamic or not quantized)."""
        raise NotImplementedError(f"backend {self.config.backend} does not expose its input observers")

    @abstractmethod
    def freeze(self, model: nn.Module) -> None:
        ...

    def runtime(self, model: nn.Module) -> dict[str, Any]:
        """How the frozen model's quantized layers execute here (kernels chosen for this
        machine), for the report; {} when nothing is chosen at run time."""
        return {}

    @abstractmethod
    def state(self, model: nn.Module) -> dict[str, Any]:
        ...

    def quantized_linears(self, model: nn.Module) -> QuantizedLinears:
        """Every frozen quantized Linear of `model` by name (on a model `restore` rebuilt: the
        shapes a checkpoint must fill)."""
        raise UserError(f"quantization.backend {self.config.backend} keeps no integer layers to export: use export.format fake-quant")

    def linear_state(self, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The state of this backend's frozen module holding `linear`'s integers and scales."""
        raise UserError(f"quantization.backend {self.config.backend} keeps no integer layers to load: use export.format fake-quant")

    @abstractmethod
    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        ...
