"""The recipe's `regcache:` options, and the settings a search chooses from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from quantsink.recipe import PositiveInt

AUTO = "auto"
REGISTER_LADDER = (1, 2, 3, 4, 6, 8, 11, 15)  # auto tau, 1..15
DELETE_LADDER = tuple(range(1, 11))  # auto k~, 1..10
SEARCHABLE = ("sensitive_layer", "prefix_start", "num_registers", "delete_tokens")
# Where the prefix goes: every block from `prefix_start` to the last (the paper's CLIP, OpenCLIP
# and SigLIP setting), or only the sensitive block (its DINOv2 setting).
PREFIX_BLOCKS = ("to_last", "sensitive_only")


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
    """`auto` fields are searched, each part's "off" (tau 0, k~ 0) included, so the search can
    choose naive, either part alone or both. An integer fixes the field; tau or k~ 0 turns that
    part off. `prefix_blocks: auto` takes the model family's default (`to_last`, DINOv2
    `sensitive_only`). `validation_fraction` of the calibration images judge the trials and never
    build the registers or set a trial's scales."""

    model_config = ConfigDict(extra="forbid")

    sensitive_layer: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    prefix_start: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    num_registers: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, REGISTER_LADDER[-1])] = AUTO
    delete_tokens: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, DELETE_LADDER[-1])] = AUTO
    prefix_blocks: Literal["auto", "to_last", "sensitive_only"] = AUTO
    candidate_top_k: PositiveInt = 100
    refill: Literal["none", "neighbours"] = "none"
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25


@dataclass(frozen=True)
class RegCacheSettings:
    """What gets installed. `num_registers` 0 leaves the prefix out and `delete_tokens` 0 the
    deletion; both 0 is the naive model."""

    sensitive_layer: int
    prefix_start: int
    num_registers: int
    delete_tokens: int
    refill: str = "none"
    prefix_blocks: str = "to_last"

    @property
    def variant(self) -> str:
        """Which parts are on: naive, prefix-only, delete-only or both."""
        return {(False, False): "naive", (True, False): "prefix-only", (False, True): "delete-only",
                (True, True): "both"}[(self.num_registers > 0, self.delete_tokens > 0)]

    def prefixed_blocks(self, num_blocks: int) -> range:
        if not self.num_registers:
            return range(0)
        if self.prefix_blocks == "sensitive_only":
            return range(self.sensitive_layer, self.sensitive_layer + 1)
        return range(self.prefix_start, num_blocks)

    def first_changed_block(self) -> int:
        """The first block whose computation these settings change; the sensitive block when
        they change nothing, so that every trial resumes from a block the search has cached."""
        if not self.num_registers or self.prefix_blocks == "sensitive_only":
            return self.sensitive_layer
        return min(self.prefix_start, self.sensitive_layer)
