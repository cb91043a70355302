"""Writes tests/kv/data/prepacking_reference.safetensors: what SinkQuantizedCache read back before
it stored packed codes (commit c3280e7, the simulation that kept dequantized floats), over a grid
of small configurations: every bit width, keys per_channel / per_token / calibrated, pre-RoPE on
and off, sinks none / pfn / kvsink (explicit, and streamed with `prefill: stream` and `hold`),
left padding and outliers, in float32 and float16. tests/kv/test_packed_storage.py replays the
same feeds (`replay`) on today's cache and asserts the read-backs are equal.

    python tests/kv/make_prepacking_reference.py   # only ever on c3280e7: it is the reference
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme

REFERENCE = Path(__file__).parent / "data" / "prepacking_reference.safetensors"
HEADS, HEAD_DIM, LAYERS = 2, 8, 2
# prefill in two chunks, decoding steps, another chunk (a second turn), more steps: 80 columns, 20
# key groups of 4 (the file stays small: every read-back is kept in full)
SCHEDULE = [23, 17] + [1] * 8 + [16] + [1] * 16
PADDING = 7  # a padded configuration has a second row, left-padded by this much
RECORDED_CALL = 10  # layer 0's returned tensors kept for the second turn's chunk, after 8 decoding steps
BASE = dict(group_size=4, residual_length=6)

# name: (scheme, dtype, padded, sinks: "none" | "explicit" | "stream" | "hold")
CONFIGS: dict[str, tuple[dict, torch.dtype, bool, str]] = {
    "b2_channel": ({"bits": 2}, torch.float32, False, "none"),
    "b3_channel_pfn": ({"bits": 3, "sinks": {"method": "pfn", "num_sinks": 3}}, torch.float32, True, "none"),
    "b4_channel_explicit_outliers": ({"bits": 4, "outlier_fraction": 0.1}, torch.float32, True, "explicit"),
    "b8_channel_outliers": ({"bits": 8, "outlier_fraction": 0.2}, torch.float32, False, "none"),
    "b2_channel_prerope_stream_outliers": ({"bits": 2, "outlier_fraction": 0.1, "keys": {"pre_rope": True}},
                                           torch.float32, True, "stream"),
    "b4_channel_hold": ({"bits": 4}, torch.float32, False, "hold"),
    "b3_channel_prerope": ({"bits": 3, "keys": {"pre_rope": True}}, torch.float32, False, "none"),
    "b2_token_outliers": ({"bits": 2, "outlier_fraction": 0.1, "keys": {"granularity": "per_token"}}, torch.float32, False, "none"),
    "b3_token_prerope_explicit": ({"bits": 3, "keys": {"granularity": "per_token", "pre_rope": True}}, torch.float32, True,
                                  "explicit"),
    "b4_token_pfn": ({"bits": 4, "keys": {"granularity": "per_token"}, "sinks": {"method": "pfn", "num_sinks": 2}},
                     torch.float32, False, "none"),
    "b8_token_prerope_stream": ({"bits": 8, "keys": {"granularity": "per_token", "pre_rope": True}}, torch.float32, True,
                                "stream"),
    "b2_calibrated_pfn_outliers": ({"bits": 2, "outlier_fraction": 0.1, "keys": {"ranges": "calibrated"},
                                    "sinks": {"method": "pfn", "num_sinks": 1}}, torch.float32, True, "none"),
    "b3_calibrated_prerope_explicit": ({"bits": 3, "keys": {"ranges": "calibrated", "pre_rope": True}}, torch.float32, True,
                                       "explicit"),
    "b4_calibrated_hold": ({"bits": 4, "keys": {"ranges": "calibrated"}}, torch.float32, False, "hold"),
    "b8_calibrated_prerope_outliers": ({"bits": 8, "outlier_fraction": 0.2, "keys": {"ranges": "calibrated", "pre_rope": True}},
                                       torch.float32, False, "none"),
    "b2_channel_residual0": ({"bits": 2, "residual_length": 0}, torch.float32, True, "explicit"),
    "fp16_b2_channel_pfn_outliers": ({"bits": 2, "outlier_fraction": 0.1, "sinks": {"method": "pfn", "num_sinks": 3}},
                                     torch.float16, True, "none"),
    "fp16_b4_token_prerope_explicit": ({"bits": 4, "keys": {"granularity": "per_token", "pre_rope": True}}, torch.float16, True,
                                       "explicit"),
    "fp16_b3_calibrated_stream": ({"bits": 3, "keys": {"ranges": "calibrated"}}, torch.float16, True, "stream"),
    "fp16_b8_channel_prerope_hold": ({"bits": 8, "keys": {"pre_rope": True}}, torch.float16, False, "hold"),
}


def rotary_embedding() -> LlamaRotaryEmbedding:
    return LlamaRotaryEmbedding(LlamaConfig(hidden_size=HEADS * HEAD_DIM * 2, num_attention_heads=4, num_key_value_heads=HEADS,
                                            head_dim=HEAD_DIM, max_position_embeddings=128))


def scheme_of(name: str) -> KVCacheScheme:
    overrides = CONFIGS[name][0]
    sinks = overrides.get("sinks")
    if CONFIGS[name][3] != "none":
        sinks = {"method": "kvsink", "num_sinks": 3}
    return KVCacheScheme(**{**BASE, **overrides, **({"sinks": sinks} if sinks else {})})


def build(name: str) -> tuple[SinkQuantizedCache, torch.Tensor, dict[str, torch.Tensor]]:
    """The cache of configuration `name`, its attention mask and its inputs (seeded)."""
    scheme, (_, dtype, padded, sinks) = scheme_of(name), CONFIGS[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    length = sum(SCHEDULE)
    batch = 2 if padded else 1
    shape = (LAYERS, batch, HEADS, length, HEAD_DIM)
    keys = torch.randn(shape, generator=generator) * torch.linspace(0.3, 3.0, HEAD_DIM)  # channel outliers (KIVI)
    values = torch.randn(shape, generator=generator)
    planted = [3, 30, 55]  # sink-like tokens: massive in every channel
    keys[:, :, :, planted] *= 30
    values[:, :, :, planted] *= 10
    ranges = None
    if scheme.keys.ranges == "calibrated":
        spread = keys.transpose(0, 2).reshape(HEADS, -1, LAYERS, HEAD_DIM).abs().amax(1).permute(1, 0, 2)
        ranges = torch.stack([-0.6 * spread, 0.4 * spread], dim=1)  # (layers, 2, heads, head_dim), clipping both ends
    rotary = rotary_embedding() if scheme.keys.pre_rope else None
    cache = SinkQuantizedCache(scheme, rotary_embedding=rotary, key_ranges=ranges)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[1, :PADDING] = 0
        cache.set_attention_mask(mask[:, : SCHEDULE[0]])
    if sinks == "explicit":
        cache.set_sink_positions([[3, 30, 55], [PADDING + 3, 45]][:batch])
    scores = torch.rand(batch, length, generator=generator)
    scores[:, planted] += 5.0
    scores[0, 70] = 9.0  # a late massive token: a sink if budget is left when it comes
    inputs = {"keys": keys.to(dtype), "values": values.to(dtype), "scores": scores}
    return cache, mask, inputs


def replay(name: str) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Feed configuration `name` through its cache: yields (call, layer, returned keys, returned
    values) of every update, then (-1, layer, stored keys, stored values) for each layer."""
    cache, _, inputs = build(name)
    mode = CONFIGS[name][3]
    start = 0
    for call, size in enumerate(SCHEDULE):
        for layer in range(LAYERS):
            chunk = slice(start, start + size)
            returned = cache.update(inputs["keys"][layer][..., chunk, :], inputs["values"][layer][..., chunk, :], layer)
            yield call, layer, *returned
            if layer == 0 and mode in ("stream", "hold"):  # the kvsink hook sits on the emergence block 0
                cache.offer_sinks(inputs["scores"][:, chunk], hold=mode == "hold")
        start += size
    for layer in range(LAYERS):
        yield -1, layer, cache.layers[layer].keys, cache.layers[layer].values


def recorded(name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for call, layer, keys, values in replay(name):
        streamed = CONFIGS[name][3] in ("stream", "hold")  # layer 1 runs after the hook: another path
        if (call == -1 and (layer == 0 or streamed)) or (call == RECORDED_CALL and layer == 0):
            at = "final" if call == -1 else f"call{call}"
            tensors[f"{name}/{at}/layer{layer}/keys"] = keys.contiguous()
            tensors[f"{name}/{at}/layer{layer}/values"] = values.contiguous()
    return tensors


def main() -> None:
    tensors = {}
    for name in CONFIGS:
        tensors.update(recorded(name))
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, REFERENCE, metadata={"commit": "c3280e7", "written_by": "tests/kv/make_prepacking_reference.py"})
    print(f"{REFERENCE}: {len(tensors)} tensors, {REFERENCE.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
