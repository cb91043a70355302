"""The recipe's `regcache:` options, and the settings a search chooses from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict

from quantsink.recipe import PositiveInt

AUTO = "auto"
REGISTER_LADDER = (1, 2, 3, 4, 6, 8, 11, 15)  # auto tau, 1..15
DELETE_LADDER = tuple(range(11))  # auto k~, 0..10
SEARCHABLE = ("sensitive_layer", "prefix_start", "num_registers", "delete_tokens")


def _auto_or_integer(low: int, high: int | None):
    def check(value: Any) -> Any:
        if value == AUTO:
            return value
        in_range = isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)
        if not in_range:
            bounds = f"{low}-{high}" if high is not None else f">= {low}"
            raise ValueError(f"expected 'auto' or an integer {bounds}, got {value!r}")
        return value

    return BeforeValidator(check)


class RegCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sensitive_layer: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    prefix_start: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    num_registers: Annotated[Union[int, Literal["auto"]], _auto_or_integer(REGISTER_LADDER[0], REGISTER_LADDER[-1])] = AUTO
    delete_tokens: Annotated[Union[int, Literal["auto"]], _auto_or_integer(DELETE_LADDER[0], DELETE_LADDER[-1])] = AUTO
    candidate_top_k: PositiveInt = 100
    refill: Literal["none", "neighbours"] = "none"


@dataclass(frozen=True)
class RegCacheSettings:
    """What gets installed. `num_registers` 0 leaves the prefix out and `delete_tokens` 0 the
    deletion (the prefix-only and delete-only ablations; recipes always ask for a prefix)."""

    sensitive_layer: int
    prefix_start: int
    num_registers: int
    delete_tokens: int
    refill: str = "none"
