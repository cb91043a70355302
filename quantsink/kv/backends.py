"""The KV cache implementations a recipe names in `kv_cache.backend`. What each one supports is
declared in quantsink.kv.scheme (BACKEND_SUPPORT), so recipes are checked without importing this."""
from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache

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
        rotary = adapter.rotary_embedding() if scheme.keys.pre_rope else None
        return SinkQuantizedCache(scheme, rotary_embedding=rotary)


class TransformersQuantoKVCacheBackend(KVCacheBackend):
    """transformers' own `QuantizedCache` with optimum-quanto (the baseline quantsink's cache is
    measured against): 2 or 4 bits, per-token keys and values in groups of `group_size` channels,
    no sinks, no pre-RoPE keys, no outliers. It quantizes the whole prompt at the first update and
    re-quantizes everything whenever its residual buffer fills, so its error compounds where
    SinkQuantizedCache quantizes each token once."""

    def build(self, scheme: KVCacheScheme, adapter: Adapter) -> Cache:
        from transformers import QuantizedCache

        return QuantizedCache(
            backend="quanto",
            config=adapter.model.config,
            nbits=scheme.bits,
            axis_key=0,
            axis_value=0,
            q_group_size=scheme.group_size,
            residual_length=scheme.residual_length,
        )


# the registry holds an instance of each class (the lazy entries name the class)
KV_CACHE_BACKENDS.register("quantsink")(QuantsinkKVCacheBackend())
KV_CACHE_BACKENDS.register("transformers-quanto")(TransformersQuantoKVCacheBackend())
