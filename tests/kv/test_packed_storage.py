"""Packed KV storage: SinkQuantizedCache reads back, bit for bit, what the simulation that kept
dequantized floats read back (tests/kv/data/prepacking_reference.safetensors, written on
c3280e7 by tests/kv/make_prepacking_reference.py) at every bit width and key granularity, with
sinks, left padding and outliers, in fp32 and fp16; it holds codes packed into uint8, ranges
in the model's dtype and sparse outliers, and `memory()` measures what its tensors hold."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import DynamicCache

from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.packing import pack, packed_bytes, unpack
from quantsink.kv.scheme import KVCacheScheme
from quantsink.kv.storage import PackedTokens

sys.path.insert(0, str(Path(__file__).parent))
import make_prepacking_reference as reference  # noqa: E402


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    with safe_open(reference.REFERENCE, framework="pt") as file:
        assert file.metadata()["commit"] == "c3280e7"
        return {name: file.get_tensor(name) for name in file.keys()}


@pytest.mark.parametrize("name", sorted(reference.CONFIGS))
def test_read_back_is_bit_identical_to_the_prepacking_simulation(recorded, name):
    _, mask, inputs = reference.build(name)
    compared = 0
    for call, layer, keys, values in reference.replay(name):
        at = "final" if call == -1 else f"call{call}"
        if f"{name}/{at}/layer{layer}/keys" not in recorded:
            continue
        real = mask[:, : keys.shape[-2]].bool()  # padding reads back as zeros now, exact before: never attended
        for kind, got in (("keys", keys), ("values", values)):
            expected = recorded[f"{name}/{at}/layer{layer}/{kind}"]
            assert got.dtype == expected.dtype and got.shape == expected.shape, (at, layer, kind)
            assert torch.equal(got.transpose(1, 2)[real], expected.transpose(1, 2)[real]), (at, layer, kind)
            compared += 1
        if call == -1:  # the reference quantized this layer: the comparison is not of exact copies
            assert not torch.equal(expected, inputs[kind][layer])
    assert compared >= 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_into_bits_per_code_and_unpack_exactly(bits):
    for length in (64, 4096, 13, 1):
        codes = torch.randint(0, 2**bits, (2, 3, length), dtype=torch.uint8, generator=torch.Generator().manual_seed(length))
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_bytes(length, bits)
        assert torch.equal(unpack(packed, bits, length), codes)
    assert packed_bytes(64, bits) == 64 * bits // 8


def filled(bits: int, dtype: torch.dtype, tokens: int = 1024, **scheme) -> SinkQuantizedCache:
    generator = torch.Generator().manual_seed(bits)
    cache = SinkQuantizedCache(KVCacheScheme(bits=bits, group_size=64, residual_length=128, **scheme))
    for layer in range(2):
        states = torch.randn(1, 4, tokens, 64, generator=generator).to(dtype)
        cache.update(states, states, layer)
    return cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_codes_are_uint8_and_ranges_and_outliers_are_in_the_models_dtype(dtype):
    cache = filled(2, dtype, outlier_fraction=0.01, sinks={"method": "pfn", "num_sinks": 5})
    layer = cache.layers[0]
    values, keys = layer.packed["values"], layer.packed["keys"]
    stored = 1024 - 5 - 128  # stream tokens that left the window
    assert values.count.tolist() == [stored] and keys.count.tolist() == [stored // 64 * 64]
    assert values.arrays["codes"].dtype == torch.uint8 and values.arrays["codes"].shape == (1, 4, stored, 64 * 2 // 8)
    assert keys.arrays["codes"].shape == (1, 4, stored // 64, 64 * 64 * 2 // 8)  # a key group: 64 tokens x 64 channels
    assert values.arrays["ranges"].dtype == dtype and values.arrays["ranges"].shape == (1, 4, stored, 1, 2)
    assert keys.arrays["ranges"].shape == (1, 4, stored // 64, 64, 2)  # per channel of each group
    # sparse outliers: 1% of a token's 256 entries (3) for values, of a key channel's 64 tokens (1)
    assert values.arrays["outlier_values"].shape == (1, stored, 3) and values.arrays["outlier_index"].dtype == torch.int16
    assert keys.arrays["outlier_values"].shape == (1, 4, stored // 64, 64, 1)
    assert values.arrays["outlier_values"].dtype == dtype
    # exact: the window (and, for keys, the incomplete group) in the tail, the 5 sinks in their side buffer
    assert layer.exact["values"].tail.shape[-2] == 128 and layer.exact["keys"].tail.shape[-2] == 1024 - 5 - stored // 64 * 64
    assert layer.exact["values"].sink_columns.tolist() == [[0, 1, 2, 3, 4]]
    # no dequantized copy is kept: reading builds a transient tensor
    before = cache.memory().measured
    assert layer.keys.shape == (1, 4, 1024, 64)
    assert cache.memory().measured == before


@pytest.mark.parametrize(("bits", "ceiling"), [(2, 0.25), (4, 0.40)])
def test_measured_bytes_are_a_fraction_of_dynamic_cache_and_agree_with_the_accounting(bits, ceiling):
    cache = filled(bits, torch.float16, tokens=4096, sinks={"method": "pfn", "num_sinks": 5})
    dynamic = DynamicCache()
    for layer in range(2):
        states = torch.zeros(1, 4, 4096, 64, dtype=torch.float16)
        dynamic.update(states, states, layer)
    dynamic_bytes = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in dynamic.layers)
    memory = cache.memory()
    assert memory.baseline == dynamic_bytes  # the accounting's fp16 cache is DynamicCache's
    assert memory.measured <= ceiling * dynamic_bytes, memory
    assert memory.measured == pytest.approx(memory.total, rel=0.05), memory
    assert memory.measured >= memory.total  # bookkeeping and slack come on top, never below


def test_capacity_grows_in_chunks_while_decoding():
    cache = filled(2, torch.float16, tokens=512)
    layer = cache.layers[0]
    capacities = set()
    for _ in range(300):
        token = torch.randn(1, 4, 1, 64).half()
        cache.update(token, token, 0)
        store = layer.packed["values"]
        capacity = store.arrays["codes"].shape[2]
        assert 0 <= capacity - int(store.count.max()) <= PackedTokens.GROWTH
        capacities.add(capacity)
    assert len(capacities) == 3  # 512 + 300 tokens: two chunks of 128 past what the prefill stored, never a doubling
    assert layer.exact["values"].tail.shape[-2] == 128  # the window only: trimmed as tokens leave it


def test_16_bits_returns_what_dynamic_cache_returns_and_holds_the_same_bytes():
    cache, dynamic = SinkQuantizedCache(KVCacheScheme(bits=16)), DynamicCache()
    states = torch.randn(2, 2, 40, 16, dtype=torch.float16)
    for start in (0, 30, 31):
        stop = start + 30 if start == 0 else start + 1
        ours, theirs = cache.update(states[..., start:stop, :], states[..., start:stop, :], 0), \
            dynamic.update(states[..., start:stop, :], states[..., start:stop, :], 0)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert cache.memory().measured == sum(t.untyped_storage().nbytes() for t in (dynamic.layers[0].keys, dynamic.layers[0].values))


def test_exact_layers_keep_every_token_as_it_came_while_the_others_are_packed():
    scheme = KVCacheScheme(bits=2, group_size=64, residual_length=128, exact_layers=[1])
    cache, dynamic = SinkQuantizedCache(scheme), DynamicCache()
    generator = torch.Generator().manual_seed(0)
    for layer in range(3):
        states = torch.randn(1, 4, 512, 64, generator=generator).half()
        cache.update(states, states, layer)
        dynamic.update(states, states, layer)
    assert torch.equal(cache.layers[1].keys, dynamic.layers[1].keys) and torch.equal(cache.layers[1].values, dynamic.layers[1].values)
    assert not cache.layers[1].packed
    for quantized in (0, 2):
        assert not torch.equal(cache.layers[quantized].keys, dynamic.layers[quantized].keys)
        assert int(cache.layers[quantized].packed["values"].count) == 512 - 128
    full_precision = 2 * 512 * 4 * 64 * 2  # the exact layer's keys and values, fp16
    assert cache.layers[1].memory(torch.tensor([512])).full_precision == full_precision
    assert cache.memory().measured == pytest.approx(cache.memory().total, rel=0.05)


@pytest.mark.parametrize(("scheme", "message"), [
    ({"scales": "static", "bits": 8, "exact_layers": [0]}, "exact_layers applies to dynamic scales"),
    ({"backend": "transformers-quanto", "bits": 2, "exact_layers": [0]}, "backend transformers-quanto has no exact_layers"),
    ({"exact_layers": [1, 1]}, "exact_layers names layer 1 more than once"),
])
def test_exact_layers_are_refused_where_they_cannot_apply(scheme, message):
    with pytest.raises(ValueError) as error:
        KVCacheScheme(**scheme)
    assert message in str(error.value)


def test_an_exact_layer_past_the_models_layers_is_refused_when_its_cache_is_built():
    from quantsink.errors import UserError
    from quantsink.kv.attach import build_kv_cache
    from quantsink.testing.tiny import build_tiny_causal_lm

    adapter = build_tiny_causal_lm(layers=2)
    assert build_kv_cache(KVCacheScheme(bits=2, exact_layers=[1]), adapter).layers == []  # built lazily, layer 1 in range
    with pytest.raises(UserError) as error:
        build_kv_cache(KVCacheScheme(bits=2, exact_layers=[2]), adapter)
    message = str(error.value)
    assert "exact_layers names layer 2" in message and "has 2 decoder layers (0 to 1)" in message and "\n" not in message
