"""The KV cache implementations a recipe names in `kv_cache.backend`. What each one supports is
declared in quantsink.kv.scheme (BACKEND_SUPPORT), so recipes are checked without importing this."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache, QuantoQuantizedLayer

from quantsink.errors import UserError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.models.base import Adapter
from quantsink.registry import KV_CACHE_BACKENDS


class KVCacheBackend:
    """How a backend builds an empty cache for a model, for a scheme it supports."""

    def build(self, scheme: KVCacheScheme, adapter: Adapter) -> Cache:
        raise NotImplementedError


class QuantsinkKVCacheBackend(KVCacheBackend):
    """`SinkQuantizedCache` for dynamic scales, every option of the scheme included. Under static
    scales the model's attentions quantize their keys and values (kv-static) before the cache
    sees them, so a plain cache keeps them as they are."""

    def build(self, scheme: KVCacheScheme, adapter: Adapter) -> Cache:
        if scheme.scales == "static":
            return DynamicCache()
        layers = len(adapter.blocks())
        beyond = [layer for layer in scheme.exact_layers if layer >= layers]
        if beyond:
            raise UserError(f"kv_cache.exact_layers names layer {beyond[0]}, but {adapter.source.spec} has {layers} decoder "
                            f"layers (0 to {layers - 1}): pick from those")
        rotary = adapter.rotary_embedding() if scheme.keys.pre_rope else None
        ranges = calibrated_key_ranges(adapter.model) if scheme.keys.ranges == "calibrated" and scheme.quantizes else None
        return SinkQuantizedCache(scheme, rotary_embedding=rotary, key_ranges=ranges)


# where kv-static leaves the calibrated key ranges of `keys.ranges: calibrated` on the model (a
# plain attribute, never in the state_dict: the method's state saves them)
KEY_RANGES_ATTRIBUTE = "quantsink_kv_key_ranges"


def calibrated_key_ranges(model: nn.Module) -> torch.Tensor:
    ranges = model.__dict__.get(KEY_RANGES_ATTRIBUTE)
    if ranges is None:
        raise UserError(
            "kv_cache keys.ranges calibrated, but this model carries no calibrated key ranges: quantize it with the "
            "recipe (kv-static calibrates them) or load it with quantsink.load(OUT)"
        )
    return ranges


class TransformersQuantoKVCacheBackend(KVCacheBackend):
    """transformers' own `QuantizedCache` with optimum-quanto, the baseline quantsink's cache is
    measured against: 2 or 4 bits, values per token and keys per token (quanto's `axis=0`) or per
    channel (`axis=-1`), in groups of `group_size`; no sinks, pre-RoPE keys or outliers.

    quanto's grouping, as `optimum.quanto.tensor.grouped.group` reshapes a (batch, heads, tokens,
    head_dim) tensor: `axis=0` takes `group_size` consecutive channels of one token (quantsink's
    per-token groups when `group_size` divides head_dim), `axis=-1` one channel over `group_size`
    consecutive entries of the flattened (batch, heads, tokens) order (quantsink's per-channel
    groups when the tokens are whole groups, else a group runs on into the next head). Both are
    asymmetric min-max with quantsink's rounding, so equal groups give bit-identical read-backs;
    the layers here refuse, with one line, a quantization whose groups would straddle a token or
    a head, instead of mixing them silently.

    Its window is not quantsink's `residual_length`. Its first update quantizes the whole prompt;
    every later update of n tokens returns [dequantized part, buffer, new] and, when buffer + n
    >= `residual_length`, re-quantizes all of it and empties the buffer, else appends the n tokens
    to the buffer. So between 0 and `residual_length - 1` of the newest tokens are exact (a
    sawtooth), and with updates of at least `residual_length` tokens (chunked prefill with chunks
    >= residual_length, e.g. residual_length 0) none: what quantsink's residual_length 0 keeps.
    Re-quantizing already quantized groups gives them back (their extremes are levels; in float32
    bit for bit, tests/kv/test_baselines.py), so the flushes add no error of their own. Padding
    enters its groups (it has no mask)."""

    def build(self, scheme: KVCacheScheme, adapter: Adapter) -> Cache:
        return WholeGroupQuantizedCache(adapter.model.config, scheme)


class WholeGroupQuantoLayer(QuantoQuantizedLayer):
    """quanto's layer, refusing groups that straddle a token (`axis=0`) or a head (`axis=-1`)."""

    def _quantize(self, tensor: torch.Tensor, axis: int):
        tokens, head_dim = tensor.shape[-2:]
        if axis == 0 and head_dim % self.q_group_size:
            raise UserError(
                f"transformers' QuantizedCache groups {self.q_group_size} consecutive entries, which straddle tokens of "
                f"head_dim {head_dim}: pick a group_size that divides {head_dim}"
            )
        if axis == -1 and tokens % self.q_group_size:
            raise UserError(
                f"transformers' QuantizedCache quantizes per-channel keys over all {tokens} cached tokens at once, not "
                f"whole groups of {self.q_group_size}, so a group would mix heads: feed it multiples of group_size tokens "
                "(chunked prefill) or use keys.granularity per_token"
            )
        return super()._quantize(tensor, axis)


class WholeGroupQuantizedCache(QuantizedCache):
    """transformers' `QuantizedCache` (quanto) for `scheme`, with `WholeGroupQuantoLayer`s."""

    def __init__(self, config: PretrainedConfig, scheme: KVCacheScheme):
        settings = dict(
            nbits=scheme.bits,
            axis_key=-1 if scheme.keys.granularity == "per_channel" else 0,
            axis_value=0,
            q_group_size=scheme.group_size,
            residual_length=scheme.residual_length,
        )
        super().__init__(backend="quanto", config=config, **settings)  # checks the layer types and settings
        self.layers = [WholeGroupQuantoLayer(**settings) for _ in self.layers]


# the registry holds an instance of each class (the lazy entries name the class)
KV_CACHE_BACKENDS.register("quantsink")(QuantsinkKVCacheBackend())
KV_CACHE_BACKENDS.register("transformers-quanto")(TransformersQuantoKVCacheBackend())
