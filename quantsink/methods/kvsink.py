"""KVSink (Su et al., arXiv 2508.04257): predict the attention-sink tokens of an LLM at prefill
from its stable outlier channel, so the KV cache keeps exactly those tokens in full precision
and out of every scale and zero point.

LLMs grow "massive activations" (Sun et al. 2024) at an early layer, in a few fixed channels of
the residual stream, on the first token and on some delimiters; they stay nearly constant until
the last layers, and those tokens are the attention sinks. Hence:

Offline, once per model (`apply`, on the calibration text):
  1. every decoder block's output is watched; per block, each channel's largest |h| over the
     real tokens is compared with the block's typical token scale: the median over real tokens
     of their RMS over channels (averaged over batches). A channel is massive at a block when its
     peak is at least `massive_ratio` times that scale. (The RMS, not the median entry: residual
     streams can be sparse, and a median entry near zero would make every channel massive.)
  2. the emergence layer l_E is the first block with a *stable* massive channel: one that stays
     massive in at least `stable_fraction` of the blocks from there to the last. Its stable
     channels, largest first, are the outlier channels; the first one scores tokens.
  3. the sink threshold is what "massive" means at l_E: `massive_ratio` times its token scale.

At inference (`install`): a forward hook on block l_E scores every token of each forward call
(prefill chunk or decoding step) by |h[l_E]| in the outlier channel, drops those under the
threshold, and offers the rest to the `SinkQuantizedCache` the call runs with
(`offer_sinks`): the cache keeps each row's top `num_sinks` and has not quantized any of those
tokens yet, in any layer. The threshold is quantsink's addition to the paper's plain top-k: a
prompt with fewer real sinks than `num_sinks` does not spend the budget on ordinary tokens, and
a delimiter that arrives later (a generated ".") still finds a slot. The hook costs one channel
read and a comparison per token.

The recipe's `kv_cache.sinks` configures it (quantsink.kv.scheme): `method: kvsink` implies this
method, `num_sinks` is the cache's budget and `profile` (SinkProfiling) this method's options.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from quantsink.errors import CheckpointError, UserError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme, SinkProfiling
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.capabilities import KVCacheHost
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.registry import METHODS

log = logging.getLogger(__name__)


class SinkProfile(BaseModel):
    """What profiling found; saved in OUT/quantsink.json. `scale`: the typical token RMS at l_E;
    `peak`: the outlier channel's largest |h| there; `layer_ratios`: per block, the largest channel
    peak over the block's typical token RMS (the evidence, for the report)."""

    model_config = ConfigDict(extra="forbid")

    emergence_layer: Annotated[int, Field(ge=0)]
    channels: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    threshold: Annotated[float, Field(gt=0.0)]
    scale: float
    peak: float
    layer_ratios: list[float]

    @property
    def channel(self) -> int:
        return self.channels[0]


def profile_sinks(
    adapter: Adapter, batches: list[dict[str, torch.Tensor]], options: SinkProfiling, progress: bool = True
) -> SinkProfile:
    """Find the emergence layer, the stable outlier channels and the sink threshold (module docstring)."""
    blocks = adapter.blocks()
    peaks: list[torch.Tensor | None] = [None] * len(blocks)
    scales: list[list[float]] = [[] for _ in blocks]
    real: torch.Tensor | None = None

    def watch(index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = hidden_states_of(output).detach().float()
            tokens = hidden[real] if real is not None else hidden.flatten(0, -2)
            if not torch.isfinite(tokens).all():
                raise UserError(
                    f"non-finite activations (NaN or inf) at the output of decoder block {index}: "
                    "check the model's weights and inputs, or run it in float32"
                )
            magnitude = tokens.abs()
            peak = magnitude.amax(dim=0)
            peaks[index] = peak if peaks[index] is None else torch.maximum(peaks[index], peak)
            scales[index].append(float(tokens.pow(2).mean(dim=-1).sqrt().median()))

        return hook

    handles = [block.register_forward_hook(watch(index)) for index, block in enumerate(blocks)]
    try:
        for inputs in tqdm(batches, desc="kvsink profile", unit="batch", disable=not progress):
            mask = adapter.token_mask(inputs)
            real = mask.bool() if mask is not None else None
            adapter.embed(inputs)
    finally:
        for handle in handles:
            handle.remove()

    scale = torch.tensor([sum(values) / len(values) for values in scales]).clamp_min(1e-12)
    peak = torch.stack(peaks)  # (blocks, channels)
    massive = peak >= options.massive_ratio * scale.unsqueeze(1)
    ratios = (peak.amax(dim=1) / scale).tolist()
    for layer in range(len(blocks)):
        later = massive[layer:]
        stable = massive[layer] & (later.float().mean(dim=0) >= options.stable_fraction)
        if bool(stable.any()):
            channels = stable.nonzero().squeeze(-1)
            channels = channels[peak[layer, channels].argsort(descending=True)]
            profile = SinkProfile(
                emergence_layer=layer,
                channels=channels.tolist(),
                threshold=options.massive_ratio * float(scale[layer]),
                scale=float(scale[layer]),
                peak=float(peak[layer, channels[0]]),
                layer_ratios=ratios,
            )
            log.info(
                "kvsink: outlier channel %d emerges at block %d (peak %.1f, %.0fx a typical token's RMS)",
                profile.channel, layer, profile.peak, profile.peak / profile.scale,
            )
            return profile
    strongest = max(range(len(ratios)), key=ratios.__getitem__)
    raise UserError(
        f"kvsink found no stable outlier channel: the largest activation is {ratios[strongest]:.0f}x a typical token's RMS "
        f"(block {strongest}), under massive_ratio {options.massive_ratio:g}; this model shows no massive "
        "activations on this text, so use sinks: {method: pfn, num_sinks: 1} (or calibrate on more text)"
    )


def install(adapter: Adapter, profile: SinkProfile) -> HandleSet:
    """Hook block l_E so every forward call offers its tokens' sink scores to its cache; a probe
    forward proves the hook finds the cache."""
    check_profile(adapter, profile)
    block = adapter.blocks()[profile.emergence_layer]
    channel, threshold = profile.channel, profile.threshold
    tally = Tally(f"the kvsink sink predictor on decoder block {profile.emergence_layer}")

    def offer(_module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = adapter.cache_of_call(kwargs)
        if not isinstance(cache, SinkQuantizedCache) or cache.scheme.sinks.method != "kvsink":
            return
        scores = hidden_states_of(output)[..., channel].detach().abs().float()
        cache.offer_sinks(scores.masked_fill(scores < threshold, float("-inf")))
        tally.ran()

    with installing(adapter.model, "kvsink") as handles:
        handles.add(block.register_forward_hook(offer, with_kwargs=True))
        probe_cache = SinkQuantizedCache(KVCacheScheme(sinks={"method": "kvsink", "num_sinks": 1}))
        require_runs(adapter.model, [tally], lambda: adapter.probe_kv_cache(probe_cache))
    return handles


def check_profile(adapter: Adapter, profile: SinkProfile) -> None:
    if profile.emergence_layer >= adapter.num_blocks:
        raise CheckpointError(
            f"the kvsink profile names decoder block {profile.emergence_layer}, but the model has "
            f"{adapter.num_blocks} (0-{adapter.num_blocks - 1}): the profile belongs to another model, "
            "quantize this one again"
        )
    width = adapter.hidden_size
    if max(profile.channels) >= width:
        raise CheckpointError(
            f"the kvsink profile names channel {max(profile.channels)}, but the model's hidden size is {width}: "
            "the profile belongs to another model, quantize this one again"
        )


@METHODS.register("kvsink")
class KVSink(Method):
    name = "kvsink"
    options_model = SinkProfiling
    requires = (KVCacheHost,)

    def __init__(self, options: SinkProfiling):
        super().__init__(options)
        self.profile: SinkProfile | None = None

    def apply(self, context: MethodContext) -> dict[str, Any]:
        self.profile = profile_sinks(context.adapter, context.calibration_batches, self.options, context.progress)
        install(context.adapter, self.profile)
        return self.profile.model_dump()

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"options": self.options.model_dump(), "profile": self.profile.model_dump()}, {}

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "KVSink":
        try:
            method = cls(SinkProfiling.model_validate(state["options"]))
            method.profile = SinkProfile.model_validate(state["profile"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the kvsink state is malformed ({error}): quantize the model again") from None
        install(adapter, method.profile)
        return method
