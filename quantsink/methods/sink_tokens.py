"""sink-tokens: the few outlier tokens of an encoder (a text encoder's [CLS]) kept out of every
static activation scale, and computed in full precision, so that one per-tensor scale serves the
ordinary tokens alone.

A sentence encoder grows the text analogue of attention sinks: on all-MiniLM-L6-v2, [CLS] enters
the MLPs of blocks 0-4 with its largest activation 6-9x the median token's (channel 99 of the
attention output, 14x any other token there), at every input. A static per-tensor scale must
cover it, and every ordinary token pays: W8A8 keeps cosine 0.98, W8A6 0.6, while per-token
dynamic scales (which cost a reduction per token at run time and do not export as static int8)
recover 0.998. PrefixQuant (Chen et al. 2024) finds such tokens as those whose largest |x| over
the median token's exceeds a ratio; KVSink (Su et al. 2025) predicts them at run time from one
profiled massive channel. This method joins the two for the Linear inputs:

Offline (`apply`, on the calibration text, before the quantizer is prepared):
  1. every Linear the recipe quantizes is watched; at its input a token is an outlier when its
     largest |x| is at least `outlier_ratio` times the batch's median token's. The report names
     them per Linear: token text, position, and in what share of the inputs they appear.
  2. the emergence Linear is the first, in model order, whose input has outliers. Its channel
     that best separates them (the outlier tokens' smallest |x| there over the other tokens'
     largest) predicts them; the threshold is the geometric mean of those two values.

At run time (`install`): in each forward of the model, the input of the emergence Linear is
read in that one channel, and the tokens at or over the threshold are the outlier rows of that
forward: no reduction over the other tokens. Every protected Linear (by default those whose
input had outliers in calibration; `protect: from_emergence`: all from the emergence Linear on)
then
  - while it is calibrating, takes those rows as zeros, so that no observer of any backend sees
    them (zero lies inside every range an observer gives);
  - once frozen, computes them again in float: the row's unquantized input times the layer's own
    weight, dequantized, plus its bias, written over what the quantized product gave them.
The ordinary tokens keep the static per-tensor scale and the backend's kernel.

The backends replace the Linears after this method installs (and restore them after it on a
load), and quanto observes inputs from a process-wide hook that runs before any module's own
hooks. So the method's hooks are process-wide too, registered before any quantizer's: they find
this model's protected Linears by name at the start of each of its forwards and leave every
other module alone. A probe forward proves they run; a protected Linear reached before the
predictor in a forward fails loudly.

Atop SmoothQuant (quantsink.methods.smoothquant, listed before it in `methods`): profiling runs
on the smoothed model, so the predicting channel, its threshold and the float rows all see the
smoothed inputs and weights. Smoothing moves most of the outlier token's range into the weights
(all-MiniLM-L6-v2 at alpha 0.8: [CLS] at 3.9x the median token at most, from 9.5x), so it
takes a lower `outlier_ratio` there (3).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from quantsink.errors import CheckpointError, UserError
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import NotRunError, Tally, require_runs
from quantsink.quantizers.base import dequantized_weight, observing_inputs, target_linears
from quantsink.registry import METHODS

log = logging.getLogger(__name__)

# the tokens each Linear's report lists, most frequent first
REPORTED_TOKENS = 5


class SinkTokensOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a token is an outlier at a Linear's input when its largest |x| is at least this many times
    # the median token's (PrefixQuant's criterion; it takes 64 for LLMs' down_proj, whose
    # outliers are far larger than an encoder's)
    outlier_ratio: Annotated[float, Field(gt=1.0)] = 5.0
    # which Linears compute the outlier rows in float: those whose input has outliers in the
    # calibration text, or every one from the emergence Linear on (on all-MiniLM-L6-v2: 9 or 32
    # Linears; holdout cosine W8A8 0.9951 or 0.9964, W8A6 0.917 or 0.930; int8 latency over naive
    # int8 1.04-1.07x or 1.04-1.13x in three runs; the float weights kept for the rows: 21 or 40 MB)
    protect: Literal["with_outliers", "from_emergence"] = "with_outliers"


class LinearOutliers(BaseModel):
    """The outlier tokens at one Linear's input over the calibration text."""

    model_config = ConfigDict(extra="forbid")

    linear: str
    max_over_median: float
    outliers: int
    tokens: int
    # the share of the calibration inputs with at least one outlier token here
    inputs_with_outliers: float
    # most frequent first: token text (when the adapter has a tokenizer) and position -> count
    top_tokens: dict[str, int]
    top_positions: dict[str, int]


class SinkTokensProfile(BaseModel):
    """What profiling found; saved in OUT/quantsink.json. `protected`: the Linears whose outlier
    rows run in float (as `SinkTokensOptions.protect` says), in model order, the emergence
    Linear first."""

    model_config = ConfigDict(extra="forbid")

    emergence: str
    channel: Annotated[int, Field(ge=0)]
    threshold: Annotated[float, Field(gt=0.0)]
    # the outlier tokens' smallest |x| in `channel` over the other tokens' largest
    separation: float
    protected: Annotated[list[str], Field(min_length=1)]
    layers: list[LinearOutliers]


class _Watch:
    """Per-Linear accumulators of the profiling pass."""

    def __init__(self, name: str, width: int):
        self.name, self.width = name, width
        self.ratio = 0.0
        self.outliers = self.tokens = self.inputs_with = 0
        self.texts: Counter[str] = Counter()
        self.positions: Counter[int] = Counter()
        # per channel, made on the device of the first input (a streamed Linear's weight is on meta)
        self.outlier_min: Optional[torch.Tensor] = None
        self.other_max: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor, real: torch.Tensor, texts: Optional[list[list[str]]], ratio: float) -> None:
        magnitude = x.detach().abs().float()
        if self.outlier_min is None:
            self.outlier_min = torch.full((self.width,), float("inf"), device=magnitude.device)
            self.other_max = torch.zeros(self.width, device=magnitude.device)
        linf = magnitude.amax(dim=-1)  # (batch, tokens)
        median = linf[real].median().clamp_min(1e-12)
        self.ratio = max(self.ratio, float(linf[real].max() / median))
        outlier = real & (linf >= ratio * median)
        other = real & ~outlier
        self.tokens += int(real.sum())
        self.outliers += int(outlier.sum())
        self.inputs_with += int(outlier.any(dim=-1).sum())
        for sample, position in outlier.nonzero().tolist():
            self.positions[position] += 1
            if texts is not None:
                self.texts[texts[sample][position]] += 1
        if outlier.any():
            self.outlier_min = torch.minimum(self.outlier_min, magnitude[outlier].amin(dim=0))
        if other.any():
            self.other_max = torch.maximum(self.other_max, magnitude[other].amax(dim=0))

    def summary(self, inputs: int) -> LinearOutliers:
        return LinearOutliers(
            linear=self.name,
            max_over_median=self.ratio,
            outliers=self.outliers,
            tokens=self.tokens,
            inputs_with_outliers=self.inputs_with / max(inputs, 1),
            top_tokens=dict(self.texts.most_common(REPORTED_TOKENS)),
            top_positions={str(position): count for position, count in self.positions.most_common(REPORTED_TOKENS)},
        )


@torch.no_grad()
def profile_outliers(
    adapter: Adapter, linears: dict[str, nn.Linear], batches: list[dict[str, torch.Tensor]],
    options: SinkTokensOptions, progress: bool = True,
) -> SinkTokensProfile:
    """Find the outlier tokens at every Linear's input, the emergence Linear, its predicting
    channel and threshold (module docstring)."""
    watches = {name: _Watch(name, linear.in_features) for name, linear in linears.items()}
    current: dict[str, Any] = {}

    def watch(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            real = current["real"] if current["real"] is not None else torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
            if x.shape[:-1] != real.shape:
                raise UserError(
                    f"sink-tokens: the input of {name} is shaped {tuple(x.shape)}, not (batch, tokens, features) as the "
                    f"model's input {tuple(real.shape)}: this model's Linears do not see one row per token, "
                    "so remove sink-tokens from the recipe's methods"
                )
            watches[name].observe(x, real, current["texts"], options.outlier_ratio)

        return hook

    token_texts = getattr(adapter, "token_texts", None)
    inputs_seen = 0
    handles = [linear.register_forward_pre_hook(watch(name)) for name, linear in linears.items()]
    try:
        for inputs in tqdm(batches, desc="sink-tokens profile", unit="batch", disable=not progress):
            mask = adapter.token_mask(inputs)
            current["texts"] = token_texts(inputs) if token_texts is not None else None
            current["real"] = mask.bool() if mask is not None else None
            inputs_seen += len(next(iter(inputs.values())))
            adapter.embed(inputs)
    finally:
        for handle in handles:
            handle.remove()

    layers = [watch.summary(inputs_seen) for watch in watches.values()]
    names = list(watches)
    emerging = next((index for index, name in enumerate(names) if watches[name].outliers), None)
    if emerging is None:
        strongest = max(layers, key=lambda layer: layer.max_over_median)
        raise UserError(
            f"sink-tokens found no outlier token: the largest token is {strongest.max_over_median:.1f}x the median "
            f"token at {strongest.linear}'s input, under outlier_ratio {options.outlier_ratio:g}; per-tensor scales "
            "lose nothing to outlier tokens here, so remove sink-tokens from the recipe (or lower outlier_ratio)"
        )
    watch = watches[names[emerging]]
    separation = watch.outlier_min / watch.other_max.clamp_min(1e-12)
    channel = int(separation.argmax())
    best = float(separation[channel])
    if best <= 1.0:
        raise UserError(
            f"sink-tokens: no channel of {watch.name}'s input separates its outlier tokens from the others (best: channel "
            f"{channel}, {best:.2f}x), so no threshold predicts them; raise outlier_ratio (now {options.outlier_ratio:g})"
        )
    profile = SinkTokensProfile(
        emergence=watch.name,
        channel=channel,
        threshold=math.sqrt(float(watch.outlier_min[channel]) * float(watch.other_max[channel])),
        separation=best,
        protected=[name for name in names[emerging:] if options.protect == "from_emergence" or watches[name].outliers],
        layers=layers,
    )
    log.info(
        "sink-tokens: outlier tokens %s emerge at %s, predicted by channel %d (%.1fx apart); %d Linears protected",
        dict(watch.texts.most_common(3)) or dict(watch.positions.most_common(3)), watch.name, channel, best,
        len(profile.protected),
    )
    return profile


class OutlierRows:
    """The hooks of one install: the predictor, and the protection of each protected Linear."""

    def __init__(self, model: nn.Module, profile: SinkTokensProfile):
        self.model, self.profile = model, profile
        self.predicted = Tally(f"the sink-tokens predictor at {profile.emergence}")
        self.kept = [Tally(f"the sink-tokens outlier rows of {name}") for name in profile.protected]
        self.positions: dict[int, int] = {}  # id of a protected Linear in the model now -> its index
        self.index: Optional[tuple[torch.Tensor, ...]] = None
        self.shape: Optional[torch.Size] = None
        self.rows: dict[int, torch.Tensor] = {}
        # per protected Linear: its frozen weight in float, and the state it was read from
        self.weights: dict[int, tuple[tuple, torch.Tensor]] = {}

    def start(self, _module: nn.Module, _args: tuple) -> None:
        """Each forward of the model: find the protected Linears (a backend may have replaced
        them since the last) and forget the last forward's outlier rows."""
        self.positions = {id(self.model.get_submodule(name)): i for i, name in enumerate(self.profile.protected)}
        self.index, self.shape = None, None
        self.rows.clear()

    def forward_state(self) -> tuple:
        """The rows the predictor found in this forward, which the Linears of later blocks use."""
        return self.positions, self.index, self.shape

    def load_forward_state(self, state: tuple) -> None:
        self.positions, self.index, self.shape = state

    def before(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        position = self.positions.get(id(module))
        if position is None:
            return None
        x = args[0]
        if position == 0:
            outlier = x[..., self.profile.channel].abs() >= self.profile.threshold
            self.index, self.shape = outlier.nonzero(as_tuple=True), outlier.shape
            self.predicted.ran()
        name = self.profile.protected[position]
        if self.index is None:
            raise NotRunError(
                f"sink-tokens: {name} ran before the predictor at {self.profile.emergence} in this forward of "
                f"{type(self.model).__name__}: the model no longer calls its Linears in the profiled order; quantize it again"
            )
        if x.shape[:-1] != self.shape:
            raise UserError(
                f"sink-tokens: {name}'s input is shaped {tuple(x.shape)}, its outlier rows were predicted for "
                f"{tuple(self.shape)} tokens: this model's Linears do not all see one row per token; remove sink-tokens"
            )
        self.rows[position] = x[self.index]
        if observing_inputs(module) and self.rows[position].numel():
            x = x.clone()
            x[self.index] = 0
            return (x, *args[1:])
        return None

    def after(self, module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        position = self.positions.get(id(module))
        if position is None:
            return
        rows = self.rows.pop(position)
        if rows.numel():
            weight = self.float_weight(position, module).to(rows.dtype)
            bias = None if module.bias is None else module.bias.to(rows.dtype)
            output[self.index] = F.linear(rows, weight, bias).to(output.dtype)
        self.kept[position].ran()

    def float_weight(self, position: int, module: nn.Module) -> torch.Tensor:
        """The layer's weight in float, dequantized once per frozen state (a float copy of each
        protected weight stays in memory): dequantizing them in every forward cost about 7% of
        an int8 forward of 16 x 128 tokens."""
        if observing_inputs(module):  # its weight may still change (freeze quantizes it)
            return dequantized_weight(module)
        state = tuple((id(tensor), tensor._version) for tensor in (module.weight, getattr(module, "weight_scale", None))
                      if tensor is not None)
        cached = self.weights.get(position)
        if cached is None or cached[0] != state:
            cached = self.weights[position] = (state, dequantized_weight(module))
        return cached[1]


def install(adapter: Adapter, profile: SinkTokensProfile) -> HandleSet:
    """Put the predictor and the protection on the model (module docstring); a probe forward
    proves every part runs."""
    check_profile(adapter, profile)
    hooks = OutlierRows(adapter.model, profile)
    with installing(adapter.model, "sink-tokens") as handles:
        handles.add(adapter.model.register_forward_pre_hook(hooks.start))
        handles.add(nn.modules.module.register_module_forward_pre_hook(hooks.before))
        handles.add(nn.modules.module.register_module_forward_hook(hooks.after))
        handles.carries(hooks)
        require_runs(adapter.model, [hooks.predicted, *hooks.kept], lambda: adapter.embed(adapter.probe_inputs()))
    return handles


def check_profile(adapter: Adapter, profile: SinkTokensProfile) -> None:
    for name in profile.protected:
        try:
            linear = adapter.model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the sink-tokens profile protects {name}, which the model lacks: the profile belongs to another model, "
                "quantize this one again"
            ) from None
        if name == profile.emergence and profile.channel >= linear.in_features:
            raise CheckpointError(
                f"the sink-tokens profile reads channel {profile.channel} of {name}, which has {linear.in_features}: "
                "the profile belongs to another model, quantize this one again"
            )


@METHODS.register("sink-tokens")
class SinkTokens(Method):
    name = "sink-tokens"
    options_model = SinkTokensOptions

    def __init__(self, options: SinkTokensOptions):
        super().__init__(options)
        self.profile: Optional[SinkTokensProfile] = None

    def apply(self, context: MethodContext) -> dict[str, Any]:
        quantization = context.recipe.quantization
        if quantization is None or quantization.activations is None or quantization.activations.dynamic:
            raise UserError(
                "sink-tokens keeps outlier tokens out of static activation scales, and the recipe quantizes no activations "
                "statically: set quantization.activations.dynamic: false, or remove sink-tokens from the methods"
            )
        linears = target_linears(context.adapter.model, quantization)
        self.profile = profile_outliers(context.adapter, linears, context.calibration_batches, self.options, context.progress)
        install(context.adapter, self.profile)
        return self.profile.model_dump()

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"options": self.options.model_dump(), "profile": self.profile.model_dump()}, {}

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SinkTokens":
        try:
            method = cls(SinkTokensOptions.model_validate(state["options"]))
            method.profile = SinkTokensProfile.model_validate(state["profile"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the sink-tokens state is malformed ({error}): quantize the model again") from None
        install(adapter, method.profile)
        return method
