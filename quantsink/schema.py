"""What every validated section (the recipe's, the KV cache scheme's) is built from: a strict
pydantic base, integer checks with a plain-language message, and names checked against a
registry without importing what they name."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from quantsink.registry import OBSERVERS, Registry


def _integer_between(low: int, high: int):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer {low}-{high}, got {value!r}")
        return value

    return BeforeValidator(check)


def _positive_integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def registered_in(registry: Registry):
    """A name `registry` holds; checked against its names only, so nothing is imported."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in registry:
            raise ValueError(registry.unknown_message(str(value)))
        return value

    return BeforeValidator(check)


Bits = Annotated[int, _integer_between(2, 8)]
PositiveInt = Annotated[int, BeforeValidator(_positive_integer)]
ObserverName = Annotated[str, registered_in(OBSERVERS)]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_default=True)
