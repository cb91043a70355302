"""The KV cache of causal LMs: one scheme (scheme.py, torch-free: what the recipe's kv_cache
section validates into), the group arithmetic (arithmetic.py), per-row state and packed-storage
accounting (storage.py), the transformers Cache (cache.py), the backends a recipe names
(backends.py) and what attaches a recipe's kv_cache section to a model (attach.py).

Nothing is imported here, so that `quantsink.kv.scheme` stays free of torch."""
