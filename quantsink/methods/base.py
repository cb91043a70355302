"""The contract every sink-aware method (RegCache, KVSink, ...) fulfils.

A method runs before the quantizer is prepared: it may search its hyperparameters (building
trial quantizers through `MethodContext.make_quantizer`, so it is tuned for the backend it will
ship with) and then installs itself on the model through the adapter. Its state is a small
JSON dict plus named tensors, so export and load never special-case a method.

Rule for installs: a method keeps its tensors out of the model's state_dict (hooks, closures or
non-persistent buffers), so the quantizer's checkpoint layout does not depend on the methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ValidationError

from quantsink.errors import UserError
from quantsink.models.base import Adapter
from quantsink.models.capabilities import describe
from quantsink.quantizers.base import Quantizer
from quantsink.recipe import Recipe, describe_validation_error


@dataclass
class MethodContext:
    adapter: Adapter
    recipe: Recipe
    calibration_batches: list[dict[str, torch.Tensor]]
    make_quantizer: Callable[[], Quantizer]
    progress: bool = True


class Method(ABC):
    name: ClassVar[str]
    options_model: ClassVar[type[BaseModel]]
    # the capability Protocols (quantsink.models.capabilities) the adapter must offer, checked
    # once by `require_capabilities` before the method is applied or restored
    requires: ClassVar[tuple[type, ...]] = ()
    # whether `apply` writes into the model's weights (folding, quantized trials): refused when
    # the weights stream from disk, where a block's writes are lost when it goes back
    writes_weights: ClassVar[bool] = False

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def validate_options(cls, options: Any) -> BaseModel:
        """Raises ValueError with `field: message` so the recipe can prefix the path."""
        try:
            return cls.options_model.model_validate(options or {})
        except ValidationError as error:
            raise ValueError(describe_validation_error(error)) from None

    @abstractmethod
    def apply(self, context: MethodContext) -> dict[str, Any]:
        """Search (if asked), install on `context.adapter`, and return the report section."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What `restore` needs: a JSON-serialisable dict and named tensors."""

    @classmethod
    @abstractmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Method":
        """Install on a freshly rebuilt model, as `apply` left the original."""


def require_capabilities(method: Method | type[Method], adapter: Adapter) -> None:
    """Refuse an adapter that lacks a capability `method` requires, saying what to do."""
    missing = next((capability for capability in method.requires if not isinstance(adapter, capability)), None)
    if missing is not None:
        article = "an" if adapter.modality[0] in "aeiou" else "a"
        raise UserError(
            f"{method.name} applies to {describe(missing)}; {adapter.source.spec} is {article} {adapter.modality} model "
            f"whose {adapter.source.family} adapter offers no {missing.__name__}: remove {method.name} from the recipe's methods"
        )
