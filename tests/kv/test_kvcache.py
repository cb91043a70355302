"""SinkQuantizedCache: exactness at 16 bits on five architectures, the quantization scheme
(error vs bits, residual window, sinks kept exact and out of the ranges, outliers, pre-RoPE),
streaming sink decisions (offer_sinks), left padding, accounting, and the chunked-prefill
evaluation (chunked_log_likelihood, compare_kv_caches)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import pytest
import torch
from transformers import (
    DynamicCache,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from quantsink.errors import UserError
from quantsink.evaluate import chunked_log_likelihood, compare_kv_caches
from quantsink.kv.arithmetic import largest_magnitudes, quantize_groups
from quantsink.kv.cache import SinkQuantizedCache, SinkQuantizedLayer
from quantsink.kv.scheme import KVCacheScheme
from quantsink.models.causal_lm import cache_keyword

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=2)),
    "mistral": (MistralForCausalLM, MistralConfig(**TINY, num_key_value_heads=2)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**TINY, num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**TINY, num_key_value_heads=2, pad_token_id=0)),
    "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**TINY)),
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    model_class, config = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = model_class(config).eval().requires_grad_(False)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy decoding is not all ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model


def fill(layer: SinkQuantizedLayer, keys: torch.Tensor, values: torch.Tensor, chunk: int) -> None:
    for start in range(0, keys.shape[-2], chunk):
        layer.update(keys[..., start : start + chunk, :], values[..., start : start + chunk, :])


def quantized_layer(**config) -> SinkQuantizedLayer:
    cache = SinkQuantizedCache(KVCacheScheme(**config))
    cache.update(torch.zeros(1, 1, 0, 8), torch.zeros(1, 1, 0, 8), 0)  # creates layer 0
    cache.reset()
    return cache.layers[0]


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximation - exact).norm() / exact.norm())


# --- 16 bits is the default cache ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_16_bits_generates_exactly_the_default_cache_tokens(name):
    model = tiny_model(name)
    prompt = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    cache = SinkQuantizedCache(KVCacheScheme(bits=16, sinks={"method": "pfn", "num_sinks": 2}))
    got = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, past_key_values=cache
    )
    assert torch.equal(got, expected)
    assert len(set(got[:, 7:].reshape(-1).tolist())) > 3  # a real continuation, not one repeated token
    assert cache.get_seq_length() == 7 + 12 - 1


def test_quantized_cache_changes_generation_and_forward_logits():
    model = tiny_model("llama")
    prompt = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    exact = model(prompt).logits
    cache = SinkQuantizedCache(KVCacheScheme(bits=2, group_size=8, residual_length=0))
    chunked = [model(prompt[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 40, 8)]
    difference = (torch.cat(chunked, dim=1) - exact).abs()
    assert float(difference[:, :8].max()) < 1e-5  # the first chunk reads nothing quantized
    assert float(difference[:, 8:].mean()) > 1e-2


# --- the scheme ---------------------------------------------------------------------------
def test_error_decreases_with_bits_for_keys_and_values():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 128, 16, generator=generator) * torch.linspace(0.2, 4, 16)  # channel outliers
    values = torch.randn(2, 2, 128, 16, generator=generator)
    errors = {}
    for bits in (2, 3, 4, 8):
        layer = quantized_layer(bits=bits, group_size=16, residual_length=0)
        fill(layer, keys, values, chunk=32)
        errors[bits] = (relative_error(layer.keys, keys), relative_error(layer.values, values))
    for name, index in (("keys", 0), ("values", 1)):
        ordered = [errors[bits][index] for bits in (2, 3, 4, 8)]
        assert ordered == sorted(ordered, reverse=True), (name, ordered)
        assert ordered[0] > 0.15 and ordered[-1] < 0.01, (name, ordered)


def test_per_channel_keys_beat_per_token_on_channel_outliers():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 16, generator=generator) + torch.linspace(-20, 20, 16)  # KIVI's case
    errors = {}
    for granularity in ("per_channel", "per_token"):
        layer = quantized_layer(bits=2, group_size=16, residual_length=0, keys={"granularity": granularity})
        fill(layer, keys, keys, chunk=16)
        errors[granularity] = relative_error(layer.keys, keys)
    assert errors["per_channel"] < errors["per_token"] / 3, errors


def test_residual_window_and_incomplete_key_groups_stay_exact():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 50, 8, generator=generator), torch.randn(2, 2, 50, 8, generator=generator)
    layer = quantized_layer(bits=2, group_size=8, residual_length=12)
    fill(layer, keys, values, chunk=5)
    # values: every token older than the last 12 is quantized, the last 12 are exact
    assert torch.equal(layer.values[..., 38:, :], values[..., 38:, :])
    assert bool((layer.values[..., :38, :] != values[..., :38, :]).any(dim=-1).all())
    # keys: only whole groups of 8 that left the window: tokens 0-31
    assert torch.equal(layer.keys[..., 32:, :], keys[..., 32:, :])
    assert bool((layer.keys[..., :32, :] != keys[..., :32, :]).any(dim=-1).all())
    assert layer.quantized_keys.tolist() == [32, 32] and layer.quantized_values.tolist() == [38, 38]


def test_tokens_of_the_current_call_are_returned_exact():
    keys = torch.randn(1, 1, 24, 8)
    layer = quantized_layer(bits=2, group_size=8, residual_length=0)
    returned, _ = layer.update(keys[..., :16, :], keys[..., :16, :])
    assert torch.equal(returned, keys[..., :16, :])  # attention of the chunk to itself is exact
    assert not torch.equal(layer.keys, keys[..., :16, :])  # but it is stored quantized
    returned, _ = layer.update(keys[..., 16:, :], keys[..., 16:, :])
    assert torch.equal(returned[..., 16:, :], keys[..., 16:, :])
    assert not torch.equal(returned[..., :16, :], keys[..., :16, :])


def sink_planted_keys(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Keys like an LLM's: ordinary tokens ~N(0, 1), sinks 100x larger in every channel."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 64, 16, generator=generator)
    sinks = [0, 13, 37]
    keys[:, :, sinks] = 100 * torch.sign(torch.randn(1, 2, 1, 16, generator=generator)) + keys[:, :, sinks]
    return keys, sinks


def test_sinks_inflate_the_scales_they_share():
    keys, sinks = sink_planted_keys()
    first = keys[0, 0, :16].T  # per-channel groups over the first 16 tokens: sinks 0 and 13 in it
    with_sink = quantize_groups(first, bits=4).scale
    without_sink = quantize_groups(first[:, [t for t in range(16) if t not in sinks]], bits=4).scale
    assert float((with_sink / without_sink).min()) > 10


@pytest.mark.parametrize("granularity", ["per_channel", "per_token"])
def test_sinks_stay_exact_and_out_of_every_range(granularity):
    keys, sinks = sink_planted_keys()
    ordinary = [t for t in range(64) if t not in sinks]
    errors = {}
    for strategy in ("none", "kvsink"):
        config = KVCacheScheme(
            bits=3, group_size=16, residual_length=0, keys={"granularity": granularity}, sinks={"method": strategy, "num_sinks": 3}
        )
        cache = SinkQuantizedCache(config)
        if strategy == "kvsink":
            cache.set_sink_positions([sinks])
        for start in range(0, 64, 16):
            cache.update(keys[..., start : start + 16, :], keys[..., start : start + 16, :], 0)
        layer = cache.layers[0]
        if strategy == "kvsink":
            assert torch.equal(layer.keys[:, :, sinks], keys[:, :, sinks])
            assert torch.equal(layer.values[:, :, sinks], keys[:, :, sinks])
        errors[strategy] = relative_error(layer.keys[:, :, ordinary], keys[:, :, ordinary])
    if granularity == "per_channel":  # sinks widen the ordinary tokens' ranges ~100x
        assert errors["kvsink"] < errors["none"] / 10, errors
    else:  # per-token ranges never mix tokens: only the sinks themselves change
        assert errors["kvsink"] == pytest.approx(errors["none"])


def test_kvsink_excludes_sinks_from_the_stream_so_groups_are_the_ordinary_tokens():
    keys, sinks = sink_planted_keys()
    cache = SinkQuantizedCache(KVCacheScheme(bits=4, group_size=16, residual_length=0, sinks={"method": "kvsink", "num_sinks": 3}))
    cache.set_sink_positions([sinks])
    cache.update(keys, keys, 0)
    ordinary = [t for t in range(64) if t not in sinks]  # 61 tokens: 3 whole groups of 16 are quantized
    assert cache.layers[0].quantized_keys.tolist() == [48]
    first_group = keys[0, 0, ordinary[:16]].T
    expected = quantize_groups(first_group, bits=4).values.T
    assert torch.allclose(cache.layers[0].keys[0, 0, ordinary[:16]], expected)
    assert torch.equal(cache.layers[0].keys[0, 0, ordinary[48:]], keys[0, 0, ordinary[48:]])


def test_pfn_keeps_the_first_real_tokens_of_each_row():
    keys = torch.randn(2, 1, 20, 8)
    cache = SinkQuantizedCache(KVCacheScheme(bits=2, group_size=4, residual_length=0, sinks={"method": "pfn", "num_sinks": 3}))
    cache.set_attention_mask(torch.tensor([[1] * 20, [0] * 5 + [1] * 15]))
    cache.update(keys, keys, 0)
    stored = cache.layers[0].keys
    assert torch.equal(stored[0, :, :3], keys[0, :, :3]) and not torch.equal(stored[0, :, 3:7], keys[0, :, 3:7])
    assert torch.equal(stored[1, :, 5:8], keys[1, :, 5:8])  # 3 sinks after 5 padding, which is not stored
    assert not bool(stored[1, :, :5].any())  # and reads back as zeros
    assert not torch.equal(stored[1, :, 8:12], keys[1, :, 8:12])


def test_outliers_are_kept_exact_and_out_of_the_range():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=generator)
    x[torch.arange(64), torch.randint(0, 32, (64,), generator=generator)] = 50.0
    plain = quantize_groups(x, bits=3)
    sparse = quantize_groups(x, bits=3, outliers=largest_magnitudes(x, 1))
    assert bool((sparse.values[x == 50.0] == 50.0).all())
    assert int(sparse.outliers.sum()) == 64
    assert relative_error(sparse.values, x) < relative_error(plain.values, x) / 5
    only_outliers = quantize_groups(x[:, :4], bits=2, outliers=torch.ones(64, 4, dtype=torch.bool))
    assert torch.equal(only_outliers.values, x[:, :4]) and bool(only_outliers.scale.isfinite().all())


def test_outliers_per_vector_round_to_the_nearest_and_keep_at_least_one():
    one_percent = KVCacheScheme(outlier_fraction=0.01)
    counts = {length: one_percent.outliers_per_vector(length) for length in (16, 128, 149, 150, 250, 4096)}
    assert counts == {16: 1, 128: 1, 149: 1, 150: 2, 250: 3, 4096: 41}  # halves up; Llama-2-7B's 4096: 41
    assert KVCacheScheme().outliers_per_vector(4096) == 0


def with_outliers(planted: torch.Tensor) -> torch.Tensor:
    """(1, 2, 32, 16) states ~N(0, 1), with magnitudes 40-60 where `planted` is set."""
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(planted.shape, generator=generator)
    big = 40 + 20 * torch.rand(int(planted.sum()), generator=generator)
    states[planted] = big * torch.randn(big.shape, generator=generator).sign()
    return states


def test_per_token_outliers_are_the_largest_of_each_token_vector_over_all_heads():
    # a token's vector: 2 heads x 16 = 32 entries, 10% of it = 3; all 3 in one group of 4 channels of
    # head 1, so a rule of so many per group would leave some in that group's range
    planted = torch.zeros(1, 2, 32, 16, dtype=torch.bool)
    planted[0, 1, :, 4:7] = True
    states = with_outliers(planted)
    config = KVCacheScheme(bits=2, group_size=4, residual_length=0, outlier_fraction=0.1, keys={"granularity": "per_token"})
    cache = SinkQuantizedCache(config)
    cache.update(states, states, 0)
    layer = cache.layers[0]
    for stored in (layer.keys, layer.values):
        assert torch.equal(stored[planted], states[planted])
        assert float((stored - states)[~planted].abs().max()) < 1.5  # the ranges are the N(0, 1) entries' own
    vectors = states.transpose(1, 2).flatten(2)  # (batch, tokens, heads x head_dim)
    outliers = largest_magnitudes(vectors, 3).reshape(1, 32, 8, 4)
    expected = quantize_groups(vectors.reshape(1, 32, 8, 4), bits=2, outliers=outliers).values
    expected = expected.reshape(1, 32, 2, 16).transpose(1, 2)
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, expected)


def test_per_channel_key_outliers_are_the_largest_of_each_channel_of_a_group():
    # a vector: one channel of one head over a group of 16 tokens, 10% of it = 2; planted at tokens 3 and 4 of each group
    planted = torch.zeros(1, 2, 32, 16, dtype=torch.bool)
    planted[:, :, [3, 4, 19, 20]] = True
    states = with_outliers(planted)
    cache = SinkQuantizedCache(KVCacheScheme(bits=2, group_size=16, residual_length=0, outlier_fraction=0.1))
    cache.update(states, states, 0)
    keys = cache.layers[0].keys
    assert torch.equal(keys[planted], states[planted])
    assert float((keys - states)[~planted].abs().max()) < 1.5
    channels = states.reshape(1, 2, 2, 16, 16).movedim(3, -1)  # (batch, heads, groups, head_dim, tokens)
    expected = quantize_groups(channels, bits=2, outliers=largest_magnitudes(channels, 2)).values
    assert torch.equal(keys, expected.movedim(-1, 3).reshape(states.shape))


@pytest.mark.parametrize("granularity", ["per_channel", "per_token"])
def test_outliers_cost_their_value_and_index_in_packed_storage(granularity):
    heads, head_dim, tokens = 2, 32, 100
    config = KVCacheScheme(bits=4, group_size=32, residual_length=20, outlier_fraction=0.01, keys={"granularity": granularity})
    memories = []
    for scheme in (config, config.model_copy(update={"outlier_fraction": 0.0})):
        cache = SinkQuantizedCache(scheme)
        for layer in range(2):
            cache.update(torch.randn(1, heads, tokens, head_dim), torch.randn(1, heads, tokens, head_dim), layer)
        memories.append(cache.memory())
    with_outliers_memory, plain = memories
    # 80 tokens left the window: 80 values and, per token, 80 keys, 1% of 64 entries -> 1 outlier each;
    # per channel 2 key groups of 32 tokens x 64 channels, 1% of 32 -> 1 outlier per channel and group
    key_outliers = 2 * 64 if granularity == "per_channel" else 80
    assert with_outliers_memory.outliers == 2 * (80 + key_outliers) * (2 + 2)  # layers x (fp16 value + 2-byte index)
    assert with_outliers_memory.total - with_outliers_memory.outliers == plain.total and plain.outliers == 0


def test_16_bits_ignores_every_other_option():
    keys = torch.randn(1, 2, 30, 8)
    layer = quantized_layer(bits=16, group_size=4, residual_length=0, outlier_fraction=0.1)
    fill(layer, keys, keys, chunk=7)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, keys)


# --- pre-RoPE keys ------------------------------------------------------------------------
def test_pre_rope_quantizes_the_unrotated_keys():
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    head_dim = 16
    generator = torch.Generator().manual_seed(0)
    # pre-RoPE keys with large constant channels (KVQuant's observation): per-channel ranges are
    # tight before RoPE and wide after it, where the rotation spreads each channel over +-|k|
    pre = torch.randn(1, 1, 64, head_dim, generator=generator) * 0.1 + torch.linspace(2, 6, head_dim)
    positions = torch.arange(64).unsqueeze(0)
    cos, sin = rotary(pre, positions)
    from transformers.models.llama.modeling_llama import rotate_half

    post = pre * cos[:, None] + rotate_half(pre) * sin[:, None]
    errors = {}
    for pre_rope in (False, True):
        config = KVCacheScheme(bits=3, group_size=16, residual_length=0, keys={"pre_rope": pre_rope})
        cache = SinkQuantizedCache(config, rotary_embedding=rotary)
        for start in range(0, 64, 16):
            cache.update(post[..., start : start + 16, :], post[..., start : start + 16, :], 0)
        errors[pre_rope] = relative_error(cache.layers[0].keys, post)
        if pre_rope:
            unrotated = cache.layers[0].keys * cos[:, None] - rotate_half(cache.layers[0].keys) * sin[:, None]
            expected = quantize_groups(pre[0, 0].reshape(4, 16, head_dim).transpose(1, 2), bits=3).values
            assert torch.allclose(unrotated[0, 0], expected.transpose(1, 2).reshape(64, head_dim), atol=1e-4)
    assert errors[True] < errors[False] / 4, errors


def test_pre_rope_needs_the_rotary_embedding():
    with pytest.raises(UserError, match="rotary"):
        SinkQuantizedCache(KVCacheScheme(keys={"pre_rope": True}))


# --- left padding -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        KVCacheScheme(bits=16),
        KVCacheScheme(bits=2, group_size=4, residual_length=3, sinks={"method": "pfn", "num_sinks": 2}),
        KVCacheScheme(bits=3, group_size=4, residual_length=0, outlier_fraction=0.2, keys={"granularity": "per_token"}),
    ],
    ids=["16bit", "2bit-pfn", "3bit-per-token"],
)
def test_left_padded_rows_generate_what_they_generate_alone(config):
    model = tiny_model("llama", seed=3)
    rows = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 9, 5)]
    width = max(len(row) for row in rows)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(row), dtype=torch.long), row]) for row in rows])
    attention_mask = (torch.arange(width) >= width - torch.tensor([len(row) for row in rows])[:, None]).long()
    cache = SinkQuantizedCache(config)
    cache.set_attention_mask(attention_mask)
    batch = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False, past_key_values=cache, pad_token_id=0
    )
    for index, row in enumerate(rows):
        alone = model.generate(
            row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), max_new_tokens=10,
            do_sample=False, past_key_values=SinkQuantizedCache(config), pad_token_id=0,
        )
        assert torch.equal(batch[index, width:], alone[0, len(row):]), index


def test_left_padded_rows_get_the_log_likelihoods_they_get_alone():
    model = tiny_model("qwen2", seed=4)
    config = KVCacheScheme(bits=2, group_size=4, residual_length=2, sinks={"method": "kvsink", "num_sinks": 2})
    long_row = torch.randint(1, 96, (20,), generator=torch.Generator().manual_seed(0))
    short_row = long_row[5:]  # 5 padding columns: one whole chunk, so both rows see the same chunks
    input_ids = torch.stack([long_row, torch.cat([torch.zeros(5, dtype=torch.long), short_row])])
    mask = torch.stack([torch.ones(20, dtype=torch.long), (torch.arange(20) >= 5).long()])
    cache = SinkQuantizedCache(config)
    cache.set_sink_positions([[0, 11], [5 + 3, 5 + 9]])  # columns of the padded batch
    batch = chunked_log_likelihood(model, input_ids, cache, chunk_size=5, attention_mask=mask)
    alone = SinkQuantizedCache(config)
    alone.set_sink_positions([[3, 9]])
    single = chunked_log_likelihood(model, short_row[None], alone, chunk_size=5)
    assert bool((batch[1, :5] == 0).all())  # padding, and the first real token (nothing predicts it)
    assert torch.allclose(batch[1, 5:], single[0], atol=1e-4)
    assert float((single[0] - chunked_log_likelihood(model, short_row[None], DynamicCache(), chunk_size=5)[0]).abs().max()) > 1e-2


# --- streaming sink decisions (offer_sinks) -----------------------------------------------
STREAMING = dict(bits=2, group_size=4, residual_length=2)


def three_layer_llama(seed: int = 7) -> torch.nn.Module:
    """Layers 0 and 1 update the cache before a hook on block 1 runs, layer 2 after it."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 3}, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def offer_from_block(model, block: int, scores: torch.Tensor, inside=None):
    """Stand-in for the kvsink hook: after decoder `block`, each forward call offers the scores of
    the cache columns it added, read from `scores` (batch, length); `inside(cache)` runs first."""

    keyword = cache_keyword(model.model.layers[block])

    def offer(_module, _args, kwargs, output):
        cache = kwargs[keyword]
        length, new = cache.get_seq_length(), output.shape[1]
        if inside is not None:
            inside(cache)
        cache.offer_sinks(scores[:, length - new : length])

    return model.model.layers[block].register_forward_hook(offer, with_kwargs=True)


def feed(model, input_ids: torch.Tensor, cache, chunks: Sequence[int], attention_mask=None) -> None:
    """Forward calls of `chunks` tokens each through `cache`."""
    start = 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            mask = None if attention_mask is None else attention_mask[:, :end]
            model(input_ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=True)
            start = end


def sink_sets(cache: SinkQuantizedCache) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in cache.rows.sink_positions]


def stored_counts(layers) -> list[tuple[int, int]]:
    """Per layer of one row: stream tokens whose keys, and whose values, are stored quantized."""
    return [(int(layer.quantized_keys), int(layer.quantized_values)) for layer in layers]


def assert_same_storage(cache: SinkQuantizedCache, other: SinkQuantizedCache) -> None:
    for layer, twin in zip(cache.layers, other.layers, strict=True):
        assert torch.equal(layer.keys, twin.keys) and torch.equal(layer.values, twin.values)
    # the same packed storage; the bytes held may differ by the capacity each one's history grew
    assert dataclasses.replace(cache.memory(), measured=0) == dataclasses.replace(other.memory(), measured=0)


def test_offer_sinks_in_one_prefill_is_set_sink_positions_with_the_top_k():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    scores = torch.rand(2, 24, generator=torch.Generator().manual_seed(1))
    scores[1, 20] = 2.0
    top = scores.topk(3, dim=-1).indices
    handle = offer_from_block(model, 1, scores)
    try:
        streamed = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 3}))
        feed(model, input_ids, streamed, [24])
        explicit = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 3}))
        explicit.set_sink_positions(top)  # the hook still offers: explicit positions ignore it
        feed(model, input_ids, explicit, [24])
    finally:
        handle.remove()
    assert sink_sets(streamed) == [set(row.tolist()) for row in top] and 20 in sink_sets(streamed)[1]
    assert_same_storage(streamed, explicit)
    exact = DynamicCache()
    feed(model, input_ids, exact, [24])
    for layer, reference in zip(streamed.layers, exact.layers):
        assert not torch.equal(layer.values, reference.values)  # quantized, in every layer
        for row, positions in enumerate(top):
            assert torch.equal(layer.keys[row, :, positions], reference.keys[row, :, positions])
            assert torch.equal(layer.values[row, :, positions], reference.values[row, :, positions])


def test_offered_sinks_give_the_log_likelihoods_of_the_same_explicit_positions():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(2))
    massive = [[0, 7, 19], [0, 11, 26]]  # what a thresholded hook offers: -inf elsewhere
    scores = torch.full((2, 30), -math.inf)
    for row, positions in enumerate(massive):
        scores[row, positions] = torch.tensor([3.0, 1.0, 2.0])
    handle = offer_from_block(model, 1, scores)
    try:
        streamed = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 3}))
        offered = chunked_log_likelihood(model, input_ids, streamed, chunk_size=8)
    finally:
        handle.remove()
    explicit = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 3}))
    explicit.set_sink_positions(massive)
    assert torch.equal(offered, chunked_log_likelihood(model, input_ids, explicit, chunk_size=8))
    assert_same_storage(streamed, explicit)
    unprotected = SinkQuantizedCache(KVCacheScheme(bits=2, group_size=4, residual_length=2))
    assert not torch.equal(offered, chunked_log_likelihood(model, input_ids, unprotected, chunk_size=8))


def test_later_massive_tokens_become_sinks_while_budget_lasts():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    scores = torch.full((1, 24), -math.inf)
    scores[0, [0, 9, 12]] = 5.0  # in the prompt
    scores[0, [17, 20, 22]] = torch.tensor([1.0, 9.0, 8.0])  # generated one step at a time
    decided = []
    handle = offer_from_block(model, 1, scores, inside=lambda cache: decided.append(cache.rows.decided))
    try:
        cache = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 4}))
        feed(model, input_ids, cache, [16])
        assert sink_sets(cache) == [{0, 9, 12}]
        feed(model, input_ids[:, 16:], cache, [1] * 8)
    finally:
        handle.remove()
    # 17 took the last slot when it came; 20 and 22 score higher but found the budget spent
    assert sink_sets(cache) == [{0, 9, 12, 17}] and cache.rows.sink_positions.shape == (1, 4)
    assert decided == [0, *range(16, 24)]  # every call found the earlier ones decided
    explicit = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 4}))
    explicit.set_sink_positions([[0, 9, 12, 17]])
    feed(model, input_ids, explicit, [16] + [1] * 8)
    assert_same_storage(cache, explicit)
    exact = DynamicCache()  # layer 0's keys and values depend on the tokens only, not on the cache
    feed(model, input_ids, exact, [16] + [1] * 8)
    assert torch.equal(cache.layers[0].values[:, :, 17], exact.layers[0].values[:, :, 17])
    assert not torch.equal(cache.layers[0].values[:, :, 20], exact.layers[0].values[:, :, 20])


def test_padding_is_never_a_sink():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    scores = torch.arange(12, 0, -1).float().expand(2, 12).clone()  # the first columns score highest
    handle = offer_from_block(model, 1, scores)
    try:
        cache = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 2}))
        cache.set_attention_mask(mask)
        feed(model, input_ids, cache, [12], attention_mask=mask)
    finally:
        handle.remove()
    assert sink_sets(cache) == [{0, 1}, {4, 5}]


def test_layers_before_the_hook_keep_undecided_tokens_exact():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(5))
    exact = DynamicCache()  # layer 0's keys and values depend on the tokens only, not on the cache
    feed(model, input_ids, exact, [16, 8])
    seen = []

    def before_the_decision(cache):
        length, decided = cache.get_seq_length(), cache.rows.decided
        assert len(cache.layers) == 2 or cache.layers[2].get_seq_length() < length  # layer 2 runs after the hook
        layer, reference = cache.layers[0], exact.layers[0]
        assert torch.equal(layer.keys[:, :, decided:], reference.keys[:, :, decided:length])
        assert torch.equal(layer.values[:, :, decided:], reference.values[:, :, decided:length])
        # stream tokens stored quantized, in the layers before the hook: only decided ones
        seen.append((length, decided, stored_counts(cache.layers[:2])))

    scores = torch.full((1, 24), -math.inf)
    scores[0, 3] = 1.0
    handle = offer_from_block(model, 1, scores, inside=before_the_decision)
    try:
        cache = SinkQuantizedCache(KVCacheScheme(**{**STREAMING, "residual_length": 0}, sinks={"method": "kvsink", "num_sinks": 2}))
        feed(model, input_ids, cache, [16, 8])
    finally:
        handle.remove()
    # first call: nothing stored yet; second: the first call's 15 stream tokens (keys: 3 groups of 4)
    assert seen == [(16, 0, [(0, 0), (0, 0)]), (24, 16, [(12, 15), (12, 15)])]
    assert stored_counts(cache.layers) == [(20, 23)] * 3
    assert torch.equal(cache.layers[0].values[:, :, 3], exact.layers[0].values[:, :, 3])
    ordinary = [t for t in range(24) if t != 3]
    assert bool((cache.layers[0].values[0, :, ordinary] != exact.layers[0].values[0, :, ordinary]).any(-1).all())


def test_a_forward_after_undecided_tokens_fails_with_the_fix():
    model = three_layer_llama()
    input_ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = SinkQuantizedCache(KVCacheScheme(**STREAMING, sinks={"method": "kvsink", "num_sinks": 2}))
    feed(model, input_ids, cache, [8])  # no hook: nothing decided, nothing quantized
    assert cache.memory().codes == 0
    with pytest.raises(UserError, match=r"never offered as sinks .*quantsink\.kv_cache\(model\).*set_sink_positions"):
        feed(model, input_ids[:, 8:], cache, [4])
    with pytest.raises(UserError, match="scores for 3 tokens but 8"):
        cache.offer_sinks(torch.zeros(1, 3))


# --- accounting, protocol, errors ---------------------------------------------------------
def test_memory_accounting_matches_packed_storage():
    heads, head_dim, tokens = 2, 32, 100
    config = KVCacheScheme(bits=4, group_size=32, residual_length=20, sinks={"method": "pfn", "num_sinks": 4})
    cache = SinkQuantizedCache(config)
    for layer in range(2):
        cache.update(torch.randn(1, heads, tokens, head_dim), torch.randn(1, heads, tokens, head_dim), layer)
    memory = cache.memory()
    # stream: tokens 4-99; leaving the window: 4-79 -> 76 values, 64 keys (2 groups of 32)
    vector, layers = heads * head_dim, 2
    assert cache.layers[0].quantized_values.tolist() == [76] and cache.layers[0].quantized_keys.tolist() == [64]
    assert memory.codes == layers * (76 + 64) * vector * 4 // 8
    assert memory.scales_and_offsets == layers * (76 * heads + 2 * vector) * 2 * 2
    assert memory.full_precision == layers * (2 * tokens - 76 - 64) * vector * 2
    assert memory.baseline == layers * 2 * tokens * vector * 2 and memory.tokens == tokens
    assert memory.bytes_per_token == pytest.approx(memory.total / tokens)
    assert cache.bytes_per_token() == memory.bytes_per_token
    assert memory.compression == pytest.approx(memory.baseline / (memory.codes + memory.scales_and_offsets + memory.full_precision))


def test_chunked_log_likelihood_of_the_default_cache_is_the_full_forward():
    model = tiny_model("mistral")
    input_ids = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(5))
    full = torch.log_softmax(model(input_ids).logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    chunked = chunked_log_likelihood(model, input_ids, DynamicCache(), chunk_size=8)
    assert torch.allclose(chunked, full, atol=1e-5)
    sixteen = chunked_log_likelihood(model, input_ids, SinkQuantizedCache(KVCacheScheme(bits=16)), chunk_size=8)
    assert torch.equal(sixteen, chunked)


def test_compare_kv_caches_at_16_bits_is_the_reference_and_counts_only_real_predictions():
    model = tiny_model("llama")
    input_ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(8))
    mask = torch.stack([torch.ones(20, dtype=torch.long), (torch.arange(20) >= 5).long()])
    comparison = compare_kv_caches(model, input_ids, SinkQuantizedCache(KVCacheScheme(bits=16)), chunk_size=8, attention_mask=mask)
    assert comparison.kl_mean == 0 and comparison.perplexity_quantized == comparison.perplexity_reference
    assert comparison.tokens == 19 + 14  # row 1: its first real token has nothing before it
    log_likelihood = chunked_log_likelihood(model, input_ids, DynamicCache(), chunk_size=8, attention_mask=mask)
    assert comparison.perplexity_reference == pytest.approx(math.exp(-float(log_likelihood.sum()) / 33), rel=1e-5)


def test_compare_kv_caches_measures_the_kl_of_the_chunked_quantized_predictions():
    model = tiny_model("qwen2", seed=9)
    input_ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(9))
    config = KVCacheScheme(bits=2, group_size=4, residual_length=0)
    comparison = compare_kv_caches(model, input_ids, SinkQuantizedCache(config), chunk_size=8)
    # the same protocol spelled out: each chunk reads the earlier ones as the cache stores them
    cache = SinkQuantizedCache(config)
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids).logits[:, :-1], dim=-1)
        chunks = [model(input_ids[:, s : s + 8], past_key_values=cache, use_cache=True).logits for s in range(0, 24, 8)]
    quantized = torch.log_softmax(torch.cat(chunks, dim=1)[:, :-1], dim=-1)
    kl = float((reference.exp() * (reference - quantized)).sum(-1).mean())
    assert comparison.tokens == 2 * 23 and kl > 1e-3
    assert comparison.kl_mean == pytest.approx(kl, rel=1e-3)
    log_likelihood = chunked_log_likelihood(model, input_ids, SinkQuantizedCache(config), chunk_size=8)
    assert comparison.perplexity_quantized == pytest.approx(math.exp(-float(log_likelihood.mean())), rel=1e-5)


def test_misuse_fails_with_one_line_fixes():
    cache = SinkQuantizedCache(KVCacheScheme(bits=4, group_size=6))
    with pytest.raises(UserError, match="divide head_dim"):
        cache.update(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 0)
    cache = SinkQuantizedCache(KVCacheScheme(group_size=32, sinks={"method": "kvsink", "num_sinks": 2}))
    with pytest.raises(UserError, match="num_sinks"):
        cache.set_sink_positions([[0, 1, 2]])
    cache.set_sink_positions([[0, 5]])
    cache.update(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 0)
    with pytest.raises(UserError, match="before prefill"):
        cache.set_sink_positions([[0]])
    with pytest.raises(UserError, match="rows"):
        other = SinkQuantizedCache(KVCacheScheme(bits=2))
        other.set_attention_mask(torch.ones(3, 4))
        other.update(torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8), 0)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="num_sinks"):
        KVCacheScheme(sinks={"method": "pfn", "num_sinks": 0})
    with pytest.raises(ValueError):
        KVCacheScheme(bits=5)
    with pytest.raises(UserError, match="empty cache"):
        chunked_log_likelihood(tiny_model("llama"), torch.ones(1, 4, dtype=torch.long), cache)
    with pytest.raises(UserError, match="no token to predict"):
        compare_kv_caches(tiny_model("llama"), torch.ones(2, 1, dtype=torch.long), DynamicCache())


def test_beam_search_reorders_rows_and_their_state():
    model = tiny_model("llama", seed=6)
    prompt = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **beams)
    assert torch.equal(model.generate(prompt, **beams, past_key_values=SinkQuantizedCache(KVCacheScheme(bits=16))), expected)
    # a reorder mid-way leaves exactly the state of a cache fed the reordered rows from the start
    keys = torch.randn(2, 1, 24, 8, generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[1] * 24, [0] * 4 + [1] * 20])
    config = KVCacheScheme(bits=2, group_size=4, residual_length=2, sinks={"method": "pfn", "num_sinks": 1})
    reordered = SinkQuantizedCache(config)
    reordered.set_attention_mask(mask)
    reordered.update(keys[..., :10, :], keys[..., :10, :], 0)
    reordered.reorder_cache(torch.tensor([1, 0]))
    reordered.update(keys.flip(0)[..., 10:, :], keys.flip(0)[..., 10:, :], 0)
    direct = SinkQuantizedCache(config)
    direct.set_attention_mask(mask.flip(0))
    direct.update(keys.flip(0), keys.flip(0), 0)
    assert torch.equal(reordered.layers[0].keys, direct.layers[0].keys)
    assert torch.equal(reordered.layers[0].values, direct.layers[0].values)
    assert not torch.equal(direct.layers[0].keys, keys.flip(0))
