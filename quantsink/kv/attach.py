"""A recipe's kv_cache section on a model: a loaded or freshly quantized model carries its scheme
(a plain attribute: never in the state_dict), so `quantsink.kv_cache(model)` can build its cache,
and hands each forward call's attention mask to the SinkQuantizedCache it runs with."""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from quantsink.errors import UserError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.models.base import Adapter
from quantsink.models.capabilities import KVCacheHost
from quantsink.models.causal_lm import cache_in_call
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.registry import KV_CACHE_BACKENDS

KV_CACHE_ATTRIBUTE = "quantsink_kv_cache"


def attach_kv_cache(adapter: Adapter, scheme: KVCacheScheme) -> HandleSet:
    """Give the model its recipe's KV cache scheme, and have every forward call hand its 2-D
    attention mask to the SinkQuantizedCache it runs with, so that left-padded batches need no
    `set_attention_mask` in `generate`; a probe forward proves the hand-over runs."""
    model = adapter.model
    tally = Tally("the attention-mask hand-over to the KV cache")

    def hand_over_attention_mask(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        cache, mask = cache_in_call(kwargs), kwargs.get("attention_mask")
        if isinstance(cache, SinkQuantizedCache) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            cache.set_attention_mask(mask)
            tally.ran()

    with installing(model, "kv-cache") as handles:
        setattr(model, KV_CACHE_ATTRIBUTE, scheme)
        handles.on_remove(lambda: model.__dict__.pop(KV_CACHE_ATTRIBUTE, None))
        handles.add(model.register_forward_pre_hook(hand_over_attention_mask, with_kwargs=True))
        handles.carries()  # the mask goes to the call's own cache
        probe_cache = SinkQuantizedCache(KVCacheScheme(bits=16))
        require_runs(model, [tally], lambda: adapter.probe_kv_cache(probe_cache))
    return handles


def kv_cache_scheme_of(model: nn.Module) -> KVCacheScheme:
    scheme = model.__dict__.get(KV_CACHE_ATTRIBUTE)
    if scheme is None:
        raise UserError(
            "this model carries no kv_cache recipe: load it with quantsink.load(OUT) from a folder quantized "
            "with a kv_cache section (or pass the QuantizationResult of such a recipe)"
        )
    return scheme


def build_kv_cache(scheme: KVCacheScheme, adapter: Adapter) -> Cache:
    require_kv_cache(adapter)
    return KV_CACHE_BACKENDS.get(scheme.backend).build(scheme, adapter)


def require_kv_cache(
    adapter: Adapter, asker: str = "a kv_cache recipe", fix: str = "give it a causal LM, or use a recipe without kv_cache"
) -> None:
    """Refuse a model without a KV cache for what `asker` does to one, saying `fix`."""
    if not isinstance(adapter, KVCacheHost):
        raise UserError(f"{asker} quantizes a causal LM's KV cache; {adapter.source.spec} ({adapter.family}) has none: {fix}")
