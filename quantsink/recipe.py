"""The recipe: a YAML file validated into a `Recipe`. Every error names the field path, what
was expected and what was found, so that a malformed recipe is a one-line fix."""
from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from quantsink.errors import UserError
from quantsink.kv.scheme import IMPLIED_METHODS, KVCacheScheme
from quantsink.registry import EXPORT_FORMATS, METHODS, QUANTIZERS, normalise
from quantsink.schema import Bits, ObserverName, PositiveInt, Schema, registered_in


class WeightGranularity(str, Enum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"
    per_group = "per_group"


class ActivationGranularity(str, Enum):
    per_tensor = "per_tensor"
    per_token = "per_token"


class CalibrationConfig(Schema):
    data: str = "bundled"
    num_samples: PositiveInt = 64
    batch_size: PositiveInt = 8
    seed: Annotated[int, Field(ge=0)] = 0
    holdout: PositiveInt = 32
    seq_len: Optional[PositiveInt] = None


# what torch calls a device, before anything asks torch whether this machine has it
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
# accelerate's sizes ("8GiB", "500MB"), or a count of bytes
MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", re.IGNORECASE)


class ExecutionConfig(Schema):
    """How calibration passes go through the model (quantsink.sequential). `pipeline`:
    in_memory (each batch through the whole model) or sequential (the whole set through one
    block at a time). `offload_dir` (sequential only): the residual streams between blocks go
    there instead of memory, and so do the weights: the model loads with its blocks on disk, each
    read in for its turn and quantized there (quantsink.models.streaming).

    `device`: where the model computes; auto is cuda when torch sees a GPU, cpu otherwise (under
    torchrun each rank takes cuda:LOCAL_RANK). in_memory puts the whole model there; sequential
    keeps the blocks and their inputs on the CPU (or on disk) and brings one block at a time.
    `device_map: auto` (transformers models, in_memory) lets accelerate spread the model over
    the GPUs, within `max_memory` per device ({0: 70GiB, cpu: 8GiB}) when given."""

    pipeline: Literal["in_memory", "sequential"] = "in_memory"
    offload_dir: Optional[str] = None
    device: str = "auto"
    device_map: Optional[Literal["auto"]] = None
    max_memory: Optional[dict[str, int | str]] = None

    @field_validator("device")
    @classmethod
    def _device_is_a_device(cls, device: str) -> str:
        if not DEVICE.fullmatch(device):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N, mps or xpu, got {device!r}")
        return device

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_per_device(cls, memory: Any) -> Any:
        """Keys as accelerate names devices (a GPU index, cpu), values as its sizes; YAML reads
        `0:` as an integer, JSON gives it back as "0": both mean GPU 0."""
        if memory is None:
            return None
        if not isinstance(memory, dict) or not memory:
            raise ValueError(f"expected a mapping of device to size like {{0: 70GiB, cpu: 8GiB}}, got {memory!r}")
        checked = {}
        for key, size in memory.items():
            key = str(key)
            if not (key == "cpu" or key.isdigit()):
                raise ValueError(f"{key}: expected a GPU index or cpu (accelerate's max_memory keys)")
            if isinstance(size, bool) or not (isinstance(size, int) or isinstance(size, str) and MEMORY_SIZE.fullmatch(size)):
                raise ValueError(f"{key}: expected a size like 8GiB or a number of bytes, got {size!r}")
            checked[key] = size
        return checked

    @model_validator(mode="after")
    def _placements_compose(self) -> "ExecutionConfig":
        if self.offload_dir is not None and self.pipeline != "sequential":
            raise ValueError("offload_dir keeps block inputs and weights on disk between blocks: it needs pipeline: sequential")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory bounds what accelerate places on each device: it needs device_map: auto")
        if self.device_map is not None and self.pipeline != "in_memory":
            raise ValueError("device_map auto spreads the whole model over the devices for in_memory passes, and pipeline "
                             "sequential brings one block at a time to execution.device itself: drop one of them")
        if self.device_map is not None and self.device != "auto":
            raise ValueError(f"device_map auto chooses the devices itself: drop device {self.device} or device_map")
        return self


class WeightArgs(Schema):
    bits: Bits = 8
    granularity: WeightGranularity = WeightGranularity.per_channel
    group_size: Optional[PositiveInt] = None
    symmetric: bool = True
    observer: ObserverName = "minmax"

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> "WeightArgs":
        if self.granularity == WeightGranularity.per_group and self.group_size is None:
            raise ValueError("per_group granularity needs group_size (e.g. 128)")
        if self.granularity != WeightGranularity.per_group and self.group_size is not None:
            raise ValueError(f"group_size only applies to per_group granularity, not {self.granularity}")
        return self


class ActivationArgs(Schema):
    bits: Bits = 8
    granularity: ActivationGranularity = ActivationGranularity.per_tensor
    dynamic: bool = False
    symmetric: bool = True
    observer: ObserverName = "minmax"

    @model_validator(mode="after")
    def _static_needs_a_fixed_shape(self) -> "ActivationArgs":
        if self.granularity == ActivationGranularity.per_token and not self.dynamic:
            raise ValueError("per_token activations need dynamic: true (token count varies at run time)")
        if self.dynamic and self.observer != "minmax":
            raise ValueError(f"dynamic activations take the range of each tensor; observer {self.observer!r} needs dynamic: false")
        return self


class QuantizationConfig(Schema):
    backend: Annotated[str, registered_in(QUANTIZERS)] = "fake"
    weights: Optional[WeightArgs] = Field(default_factory=WeightArgs)
    activations: Optional[ActivationArgs] = Field(default_factory=ActivationArgs)
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError("expected at least one target (a module class name or 're:<regex>')")
        return targets


class ExportConfig(Schema):
    format: Annotated[str, registered_in(EXPORT_FORMATS)] = "fake-quant"


class Recipe(Schema):
    """`quantization` (weights and activations) defaults to W8A8 unless the recipe has a
    `kv_cache` section: a KV-cache recipe quantizes weights only when it says how."""

    name: str = "quantsink"
    model: Optional[str] = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    methods: list[dict[str, Any]] = Field(default_factory=list)
    quantization: Optional[QuantizationConfig] = Field(default_factory=QuantizationConfig)
    kv_cache: Optional[KVCacheScheme] = None
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="before")
    @classmethod
    def _kv_recipes_keep_weights_unless_told(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kv_cache") is not None and "quantization" not in data:
            return {**data, "quantization": None}
        return data

    @model_validator(mode="after")
    def _quantizes_something(self) -> "Recipe":
        if self.quantization is None and self.kv_cache is None:
            raise ValueError("quantization: the recipe quantizes nothing; give a quantization or a kv_cache section")
        return self

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_are_registered(cls, methods: Any) -> Any:
        """Names first, from the registry's lazy entries: a misspelt method imports nothing. A
        method's options are its own model, so checking them imports that method (only it)."""
        if methods is None:
            return []
        if not isinstance(methods, list):
            raise ValueError(f"expected a list of '- name: {{options}}' entries, got {methods!r}")
        for index, entry in enumerate(methods):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"each method is a one-key mapping like '- regcache: {{...}}', got {entry!r}")
            ((name, options),) = entry.items()
            if name not in METHODS:
                raise ValueError(METHODS.unknown_message(name))
            implied_by = IMPLIED_METHODS.get(normalise(name))
            if implied_by is not None:
                raise ValueError(f"{index}.{name}: the kv_cache section sets it: remove it from methods and write {implied_by}")
            try:
                METHODS.get(name).validate_options(options)
            except ValueError as error:
                raise ValueError(f"{index}.{name}.{error}") from None
        return methods

    def method_entries(self) -> list[tuple[str, Any]]:
        """(name, options) of every method the recipe asks for: its `methods` list, then those
        its kv_cache section implies."""
        entries = [(name, options) for entry in self.methods for name, options in entry.items()]
        return entries + (self.kv_cache.implied_methods() if self.kv_cache is not None else [])

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"recipe {path} does not exist: pass a YAML file (see recipes/)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"recipe {path} cannot be read ({error}): pass a UTF-8 YAML file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise UserError(f"recipe {path} is not valid YAML{line}: fix the syntax") from None
        return cls.from_dict(data if data is not None else {}, origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise UserError(f"{origin}: expected a mapping of recipe fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise UserError(f"{origin}: {describe_validation_error(error)}") from None

    @classmethod
    def coerce(cls, recipe: "Recipe | dict | str | os.PathLike") -> "Recipe":
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        return cls.from_yaml(recipe)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def describe_validation_error(error: ValidationError) -> str:
    """The first problem as `field.path: what was expected, what was found`."""
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"]) or "recipe"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown field; remove it or check its spelling"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("enum", "literal_error"):
        message = f"{message}, got {first.get('input')!r}"
    if re.match(r"\d+\.\S+: ", message):  # a method's own options: its path continues ours
        return f"{path}.{message}"
    return f"{path}: {message}"
