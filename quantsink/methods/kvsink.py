"""KVSink (Su et al., arXiv 2508.04257): predict the attention-sink tokens of an LLM at prefill
from its stable outlier channel, so the KV cache keeps exactly those tokens in full precision
and out of every scale and zero point.

LLMs grow "massive activations" (Sun et al. 2024) at an early layer, in a few fixed channels of
the residual stream, on the first token and on some delimiters; they stay nearly constant until
the last layers, and those tokens are the attention sinks. Hence:

Offline, once per model (`apply`, on the calibration text):
  1. every decoder block's output is watched; per block, each channel's ratio is its largest |h|
     over the real tokens over the block's typical token scale: the median over real tokens of
     their RMS over channels (averaged over batches). (The RMS, not the median entry: residual
     streams can be sparse, and a median entry near zero would make every channel massive.)
  2. a channel's stable ratio at a block is the largest r such that its ratio is at least r
     there and in at least `stable_fraction` of the blocks from there to the last. A channel is
     a stable outlier where its stable ratio reaches the cut-off: `massive_ratio` (Sun et al.'s
     massive activations) when some channel reaches it, else half the strongest stable ratio
     found, with a warning that gives the numbers: weak sinks get top-k sinks, never a refusal.
  3. the emergence layer l_E is the first block with a stable outlier; its stable outliers, by
     ratio (at most MAX_CHANNELS), are the profile's `channels` and `ratios`.

At inference (`install`): a forward hook on block l_E scores every token of each forward call
(prefill chunk or decoding step) and offers the scores to the `SinkQuantizedCache` the call runs
with (`offer_sinks`), which keeps each row's top `num_sinks` among tokens it has not quantized
in any layer yet. The score (`score`) is |h[l_E]| in the strongest channel, the paper's, or the
L2 norm over all the profile's channels (for models whose sinks spread over several).
`min_score` 0 (the default) is the paper's plain top-k; above 0, tokens scoring under
`min_score` times the token scale of l_E are never offered, so a prompt with fewer sinks than
`num_sinks` leaves slots free for a massive token that comes later (a generated "."), at the
risk of keeping fewer sinks than asked for when the model's are weaker than the cut-off.

Prompts prefilled in several forward calls (`prefill`):
* `stream` (the default) decides each call's tokens as it runs. A prompt prefilled in one call
  (what `generate` does unless `prefill_chunk_size` is set) gets exactly the paper's top-k of
  the prompt; one prefilled in chunks gets, per row, the best of each chunk while slots are
  free (with `min_score` 0 the first chunk's top-k; later sinks find a slot only if `min_score`
  left one).
* `hold` keeps every token of a multi-token call exact and undecided until a one-token call
  (generate's first decoding step) or `cache.end_prefill()`, then takes the top-k of the whole
  prompt: the paper's rule under chunked prefill, at the price of the prompt's KV in fp16 until
  the prompt ends, the peak memory chunked prefill is there to avoid.
`stream` is the default because it keeps prefill memory bounded and because it is what the
chunked evaluation measures. `quantsink.evaluate.compare_kv_caches` feeds the text in chunks
of several tokens, each attending the earlier ones through the cache, with no one-token call:
under `hold` the whole text would be one held prompt, every chunk would read the earlier ones
exact and the evaluation would measure no KV quantization at all. To measure what `hold`
chooses, give a cache the whole text's top-k with `set_sink_positions`, as the tests do (the
paper's protocol: sinks from the whole sequence, every token reading the quantized cache).

The recipe's `kv_cache.sinks` configures it (quantsink.kv.scheme): `method: kvsink` implies this
method, `num_sinks` is the cache's budget and `profile` (SinkProfiling) this method's options.
A folder saved before `min_score` existed keeps the threshold it was profiled with
(`massive_ratio` times the token scale) and the stream rule.
"""
from __future__ import annotations

import logging
import math
from functools import reduce
from typing import Annotated, Any, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantsink import distributed
from quantsink.errors import CheckpointError, UserError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme, SinkProfiling
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.capabilities import KVCacheHost
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.recipe import ExecutionConfig
from quantsink.registry import METHODS
from quantsink.sequential import IN_MEMORY, forward_passes

log = logging.getLogger(__name__)

# where install leaves (profile, options) on the model, for the static KV scales that predict
# their sinks themselves (quantsink.methods.kv_static; a plain attribute, never in the state_dict)
PREDICTOR_ATTRIBUTE = "quantsink_kvsink_predictor"
MAX_CHANNELS = 8  # the profile ranks at most this many outlier channels (Llama-2-7B has 2)
WEAK_CUTOFF = 0.5  # with no massive channel, outliers are channels at least this share of the strongest


class SinkProfile(BaseModel):
    """What profiling found; saved in OUT/quantsink.json. `channels`: the stable outlier
    channels at l_E, strongest first, and `ratios` their peak |h| over the typical token RMS
    there (`scale`); `peak`: the first channel's largest |h|; `threshold`: the score a token
    needs to be offered (`min_score` times `scale`; 0: plain top-k); `layer_ratios`: per block,
    the largest channel peak over the block's typical token RMS (the evidence, for the report).
    `ratios` is empty in folders saved before it was recorded."""

    model_config = ConfigDict(extra="forbid")

    emergence_layer: Annotated[int, Field(ge=0)]
    channels: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    ratios: list[float] = []
    threshold: Annotated[float, Field(ge=0.0)]
    scale: float
    peak: float
    layer_ratios: list[float]

    @property
    def channel(self) -> int:
        return self.channels[0]


def stable_ratios(ratios: torch.Tensor, stable_fraction: float) -> torch.Tensor:
    """(blocks, channels): the largest r such that a channel's ratio is at least r at the block
    and in at least `stable_fraction` of the blocks from there to the last."""
    blocks = ratios.shape[0]
    stable = torch.empty_like(ratios)
    for block in range(blocks):
        later = ratios[block:].sort(dim=0, descending=True).values
        # the k-th largest later ratio, k the fewest blocks that make up stable_fraction of them
        needed = max(1, math.ceil(stable_fraction * (blocks - block) - 1e-9))
        stable[block] = torch.minimum(ratios[block], later[needed - 1])
    return stable


def profile_sinks(
    adapter: Adapter, batches: Iterable[dict[str, torch.Tensor]], options: SinkProfiling, progress: bool = True,
    execution: ExecutionConfig = IN_MEMORY,
) -> SinkProfile:
    """Find the emergence layer and the ranked stable outlier channels (module docstring), with
    the passes run as `execution` says."""
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

    def enter(inputs: dict[str, torch.Tensor]) -> None:
        nonlocal real
        mask = adapter.token_mask(inputs)
        real = mask.bool() if mask is not None else None

    handles = [block.register_forward_hook(watch(index)) for index, block in enumerate(blocks)]
    try:
        forward_passes(adapter, distributed.shard(batches), execution, enter, desc="kvsink profile", progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    # under torchrun: every rank's shard in rank order, as one pass over all batches would have
    # it, so that every rank installs the same profile
    parts = distributed.gather((peaks, scales), peaks[0].device)
    peaks = [reduce(torch.maximum, [rank_peaks[index] for rank_peaks, _ in parts]) for index in range(len(blocks))]
    scales = [[value for _, rank_scales in parts for value in rank_scales[index]] for index in range(len(blocks))]

    scale = torch.tensor([sum(values) / len(values) for values in scales], device=peaks[0].device).clamp_min(1e-12)
    ratios = torch.stack(peaks) / scale.unsqueeze(1)  # (blocks, channels)
    stable = stable_ratios(ratios, options.stable_fraction)
    strongest = float(stable.max())
    cutoff = options.massive_ratio if strongest >= options.massive_ratio else WEAK_CUTOFF * strongest
    layer = int((stable.amax(dim=1) >= cutoff).nonzero()[0])
    outliers = (stable[layer] >= cutoff).nonzero().squeeze(-1)
    channels = outliers[ratios[layer, outliers].argsort(descending=True)][:MAX_CHANNELS]
    profile = SinkProfile(
        emergence_layer=layer,
        channels=channels.tolist(),
        ratios=ratios[layer, channels].tolist(),
        threshold=options.min_score * float(scale[layer]),
        scale=float(scale[layer]),
        peak=float(ratios[layer, channels[0]] * scale[layer]),
        layer_ratios=ratios.amax(dim=1).tolist(),
    )
    ranked = ", ".join(f"{channel} ({ratio:.1f}x)" for channel, ratio in zip(profile.channels, profile.ratios))
    log.info("kvsink: outlier channels emerge at block %d: %s a typical token's RMS", layer, ranked)
    if strongest < options.massive_ratio:
        block, channel = divmod(int(stable.argmax()), stable.shape[1])
        log.warning(
            "kvsink: no stable channel reaches massive_ratio %g: the strongest, channel %d from block %d, stays at "
            "%.1fx a typical token's RMS; profiled channels at block %d: %s. The sinks are weak, so the predicted "
            "top-k may hold ordinary tokens: compare with sinks: {method: pfn} on held-out text",
            options.massive_ratio, channel, block, strongest, layer, ranked,
        )
    if options.min_score > profile.ratios[0]:
        log.warning(
            "kvsink: min_score %g is above the strongest channel's peak on the calibration text (%.1fx a typical "
            "token's RMS at block %d): few or no tokens will be offered as sinks; lower it (0: plain top-k)",
            options.min_score, profile.ratios[0], layer,
        )
    return profile


def sink_scores(hidden: torch.Tensor, profile: SinkProfile, options: SinkProfiling) -> torch.Tensor:
    """(batch, tokens) sink scores of block l_E's output `hidden`, -inf under the offer threshold."""
    channels = profile.channels if options.score == "norm" else profile.channels[:1]
    scores = hidden[..., channels].detach().float().norm(dim=-1)
    return scores.masked_fill(scores < profile.threshold, float("-inf"))


def install(adapter: Adapter, profile: SinkProfile, options: SinkProfiling = SinkProfiling()) -> HandleSet:
    """Hook block l_E so every forward call offers its tokens' sink scores to its cache (`options`:
    how they are scored and whether a prompt is held); a probe forward proves the hook finds the cache."""
    check_profile(adapter, profile)
    block = adapter.blocks()[profile.emergence_layer]
    hold = options.prefill == "hold"
    if hold:
        log.warning(
            "kvsink prefill: hold keeps a prompt exact until a one-token call or cache.end_prefill(); the chunked "
            "evaluation (compare_kv_caches, the quantize report, quantsink eval) makes neither, so it would measure "
            "the cache unquantized: evaluate with prefill: stream"
        )
    tally = Tally(f"the kvsink sink predictor on decoder block {profile.emergence_layer}")

    def offer(_module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = adapter.cache_of_call(kwargs)
        if not isinstance(cache, SinkQuantizedCache) or cache.scheme.sinks.method != "kvsink":
            return
        cache.offer_sinks(sink_scores(hidden_states_of(output), profile, options), hold=hold)
        tally.ran()

    model = adapter.model
    with installing(model, "kvsink") as handles:
        setattr(model, PREDICTOR_ATTRIBUTE, (profile, options))
        handles.on_remove(lambda: model.__dict__.pop(PREDICTOR_ATTRIBUTE, None))
        handles.add(block.register_forward_hook(offer, with_kwargs=True))
        handles.carries()  # each call's scores go straight to that call's cache
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
        self.profile = profile_sinks(context.adapter, context.calibration_batches, self.options, context.progress,
                                     context.recipe.execution)
        install(context.adapter, self.profile, self.options)
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
        install(adapter, method.profile, method.options)
        return method
