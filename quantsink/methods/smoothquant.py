"""smoothquant: SmoothQuant (Xiao et al. 2023) channel smoothing, the PTQ that sink-aware
methods compose with.

A Linear's input X and weight W give the same product as (X / s) and (W * s) for any positive
per-input-channel s. With s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (maxima over the
calibration tokens and over the rows of every Linear reading X), part of each channel's range
moves from the activations, which one per-tensor scale covers, into the weights, which are
quantized per output channel. `alpha` is the migration strength.

The 1/s has to go somewhere the model computes anyway, or the function changes. Where it can
go is the family's knowledge (the adapter's `smoothing_groups`, capabilities.Smoothable):
  - folded into the weight (and bias) whose output channels make X and feed nothing else: a
    pre-LN norm, or attention's value projection for the output projection. Free at run time;
    the folded weights are the model's own, exported with it.
  - multiplied into X at a module whose input reaches those Linears alone (on post-LN BERT a
    LayerNorm's output also feeds the residual, and GELU passes no scale): one elementwise
    product per forward, measured by the latency benchmark. `inputs: foldable` leaves those
    inputs unsmoothed instead.

It changes Linear inputs and weights, which any method that profiled the model before it would
have measured unsmoothed: it runs first in a recipe's `methods` (sink-tokens after it profiles
and predicts on the smoothed inputs), and refuses a model on which something is installed.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from quantsink.errors import CheckpointError, UserError
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter
from quantsink.models.capabilities import Smoothable, SmoothingGroup
from quantsink.models.handles import HandleSet, installed, installing
from quantsink.models.probe import NotRunError, Tally, require_runs
from quantsink.quantizers.base import target_linears
from quantsink.registry import METHODS

log = logging.getLogger(__name__)

KEY = "smoothquant"
# no channel's scale goes below this (SmoothQuant's own floor): a channel that is silent in the
# calibration text would otherwise blow its weights up
MIN_SCALE = 1e-5


class SmoothQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the migration strength: 0 leaves the inputs as they are, 1 moves all of their range into the weights
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # all: every input the adapter can smooth, those no weight absorbs the 1/s of through an
    # explicit per-channel multiply; foldable: only those whose 1/s folds into a weight
    inputs: Literal["all", "foldable"] = "all"


class GroupReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    linears: list[str]
    fold_into: Optional[str]
    multiply_input_of: Optional[str]
    # the largest |x| over the calibration tokens and the largest |w|, before and after
    input_max: tuple[float, float]
    weight_max: tuple[float, float]


def groups_to_smooth(adapter: Adapter, quantized: set[str], options: SmoothQuantOptions) -> list[SmoothingGroup]:
    """The adapter's groups that hold a quantized Linear (and, under `inputs: foldable`, fold)."""
    groups = [group for group in adapter.smoothing_groups() if quantized.intersection(group.linears)]
    for group in groups:
        for name in (*group.linears, group.fold_into or group.multiply_input_of):
            try:
                adapter.model.get_submodule(name)
            except AttributeError:
                raise UserError(
                    f"smoothquant: the {adapter.source.family} adapter smooths at {name}, which this "
                    f"{type(adapter.model).__name__} lacks: this variant's layout is not supported, remove smoothquant"
                ) from None
    if options.inputs == "foldable":
        groups = [group for group in groups if group.fold_into is not None]
    if not groups:
        raise UserError(
            f"smoothquant finds no input of a quantized Linear that the {adapter.source.family} adapter can smooth"
            f"{' by folding' if options.inputs == 'foldable' else ''}: check quantization.targets, or remove smoothquant"
        )
    return groups


@torch.no_grad()
def input_maxima(
    adapter: Adapter, groups: list[SmoothingGroup], batches: list[dict[str, torch.Tensor]], progress: bool = True
) -> list[torch.Tensor]:
    """Per group, the largest |x| of each input channel over the real (unpadded) calibration tokens."""
    maxima: list[Optional[torch.Tensor]] = [None] * len(groups)
    mask: dict[str, Optional[torch.Tensor]] = {}

    def watch(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().float()
            real = mask["real"]
            rows = x[real] if real is not None and real.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            largest = rows.amax(dim=0)
            maxima[index] = largest if maxima[index] is None else torch.maximum(maxima[index], largest)

        return hook

    model = adapter.model
    handles = [model.get_submodule(group.linears[0]).register_forward_pre_hook(watch(i)) for i, group in enumerate(groups)]
    try:
        for inputs in tqdm(batches, desc="smoothquant statistics", unit="batch", disable=not progress):
            real = adapter.token_mask(inputs)
            mask["real"] = None if real is None else real.bool()
            adapter.embed(inputs)
    finally:
        for handle in handles:
            handle.remove()
    silent = [group.linears[0] for group, found in zip(groups, maxima) if found is None]
    if silent:
        raise NotRunError(f"smoothquant: the calibration pass never reached {', '.join(silent[:3])}: the model does not call it")
    return maxima


def smoothing_scales(x_max: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    w_max = torch.cat([linear.weight.detach().abs().float() for linear in linears]).amax(dim=0)
    scales = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
    # a channel no token or no weight uses keeps its scale: smoothing it moves nothing
    return torch.where((x_max > 0) & (w_max > 0), scales, torch.ones_like(scales))


@torch.no_grad()
def smooth(adapter: Adapter, groups: list[SmoothingGroup], maxima: list[torch.Tensor], alpha: float) -> tuple[dict[str, torch.Tensor], list[GroupReport]]:
    """Rescale every group's weights (and fold 1/s where the group says); returns the 1/s that
    the groups without a fold multiply into their input, by module, and what moved."""
    model = adapter.model
    multipliers: dict[str, torch.Tensor] = {}
    reports = []
    for group, x_max in zip(groups, maxima):
        linears = [model.get_submodule(name) for name in group.linears]
        weight_before = max(float(linear.weight.abs().max()) for linear in linears)
        scales = smoothing_scales(x_max, linears, alpha)
        for linear in linears:
            linear.weight.mul_(scales.to(linear.weight.dtype))
        if group.fold_into is not None:
            producer = model.get_submodule(group.fold_into)
            shape = (-1,) + (1,) * (producer.weight.dim() - 1)
            producer.weight.div_(scales.to(producer.weight.dtype).view(shape))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(scales.to(producer.bias.dtype))
        else:
            multipliers[group.multiply_input_of] = 1.0 / scales
        reports.append(GroupReport(
            linears=list(group.linears), fold_into=group.fold_into, multiply_input_of=group.multiply_input_of,
            input_max=(float(x_max.max()), float((x_max / scales).max())),
            weight_max=(weight_before, max(float(linear.weight.abs().max()) for linear in linears)),
        ))
    return multipliers, reports


def install(adapter: Adapter, multipliers: dict[str, torch.Tensor], overwrite: frozenset[str] = frozenset()) -> HandleSet:
    """Multiply each named module's first input by its 1/s, in every forward (in place for the
    modules in `overwrite`); a probe forward proves every multiply runs."""
    model = adapter.model
    tallies = []

    def multiply(name: str, inverse: torch.Tensor, tally: Tally):
        held = {"inverse": inverse}

        def hook(_module: nn.Module, args: tuple) -> Optional[tuple]:
            if not args:
                raise NotRunError(
                    f"smoothquant: {name} was called with its input by keyword, where the smoothing multiplies its first "
                    f"positional input: this {type(model).__name__} calls its modules differently; quantize it again"
                )
            x, inverse = args[0], held["inverse"]
            if inverse.device != x.device or inverse.dtype != x.dtype:
                inverse = held["inverse"] = inverse.to(device=x.device, dtype=x.dtype)
            tally.ran()
            if name in overwrite:
                x.mul_(inverse)
                return None
            return (x * inverse, *args[1:])

        return hook

    with installing(model, KEY) as handles:
        handles.carries()
        for name, inverse in multipliers.items():
            tallies.append(Tally(f"the smoothquant multiply at {name}"))
            handles.add(model.get_submodule(name).register_forward_pre_hook(multiply(name, inverse, tallies[-1])))
        if tallies:
            require_runs(model, tallies, lambda: adapter.embed(adapter.probe_inputs()))
    return handles


@METHODS.register(KEY)
class SmoothQuant(Method):
    name = KEY
    writes_weights = True  # the migration folds into the weights
    options_model = SmoothQuantOptions
    requires = (Smoothable,)

    def __init__(self, options: SmoothQuantOptions):
        super().__init__(options)
        self.multipliers: dict[str, torch.Tensor] = {}
        self.overwrite: frozenset[str] = frozenset()

    def apply(self, context: MethodContext) -> dict[str, Any]:
        quantization = context.recipe.quantization
        if quantization is None or quantization.activations is None:
            raise UserError(
                "smoothquant moves activation range into the weights, and the recipe quantizes no activations: "
                "add quantization.activations, or remove smoothquant from the methods"
            )
        earlier = sorted(installed(context.adapter.model))
        if earlier:
            raise UserError(
                f"smoothquant rescales Linear inputs that {', '.join(earlier)} measured already: list smoothquant first "
                "in the recipe's methods"
            )
        adapter = context.adapter
        groups = groups_to_smooth(adapter, set(target_linears(adapter.model, quantization)), self.options)
        if context.recipe.export.format == "compressed-tensors" and any(group.fold_into is None for group in groups):
            raise UserError(
                "smoothquant multiplies some Linear inputs by 1/s at run time, which a compressed-tensors checkpoint cannot "
                "state (transformers would load the smoothed weights without it): set inputs: foldable, or export int8 or fake-quant"
            )
        maxima = input_maxima(adapter, groups, context.calibration_batches, context.progress)
        self.multipliers, reports = smooth(adapter, groups, maxima, self.options.alpha)
        self.overwrite = frozenset(group.multiply_input_of for group in groups if group.overwrite_input)
        install(adapter, self.multipliers, self.overwrite)
        log.info("smoothquant: %d inputs smoothed (%d folded, %d multiplied at run time), alpha %g", len(groups),
                 len(groups) - len(self.multipliers), len(self.multipliers), self.options.alpha)
        return {"alpha": self.options.alpha, "inputs": self.options.inputs, "folded": len(groups) - len(self.multipliers),
                "multiplied": len(self.multipliers), "groups": [report.model_dump() for report in reports]}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # the folded scales live in the model's weights; only the run-time multiplies need saving
        state = {"options": self.options.model_dump(), "multiplied": list(self.multipliers), "overwritten": sorted(self.overwrite)}
        return state, dict(self.multipliers)

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SmoothQuant":
        try:
            method = cls(SmoothQuantOptions.model_validate(state["options"]))
            method.multipliers = {name: tensors[name] for name in state["multiplied"]}
            method.overwrite = frozenset(state["overwritten"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the smoothquant state is malformed ({error!r}): quantize the model again") from None
        for name, inverse in method.multipliers.items():
            try:
                adapter.model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(
                    f"the smoothquant state multiplies the input of {name}, which the model lacks: the folder belongs to "
                    "another model, quantize this one again"
                ) from None
            if inverse.dim() != 1:
                raise CheckpointError(f"the smoothquant multiplier of {name} is shaped {tuple(inverse.shape)}, not one per channel: re-export")
        install(adapter, method.multipliers, method.overwrite)
        return method
