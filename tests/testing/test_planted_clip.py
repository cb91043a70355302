"""The planted-sink CLIP fixture shows, with numbers, the phenomenon RegCache repairs."""
import copy
import math

import pytest
import torch
from torch import nn
from transformers import CLIPVisionModel

from quantsink.errors import UserError
from quantsink.models import resolve
from quantsink.models.attention import KVPrefix
from quantsink.quantizers.functional import fake_quantize, fake_quantize_along, qparams_from_range
from quantsink.testing.planted_clip import build_planted_clip, planted_clip_inputs, planted_sinks

DELETED = 4  # RegCache's k~: patch tokens deleted per image at the emergence block's input


@pytest.fixture(scope="module")
def model():
    return build_planted_clip(seed=0)


@pytest.fixture(scope="module")
def pixels():
    return planted_clip_inputs(64, seed=0)


@pytest.fixture(scope="module")
def run(model, pixels):
    """The model's output with hidden states (index 0: encoder input, i + 1: block i output)
    and attentions, and the input of every block's fc2."""
    fc2_inputs = {}
    hooks = [
        layer.mlp.fc2.register_forward_pre_hook(lambda module, args, i=i: fc2_inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.encoder.layers)
    ]
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
    for hook in hooks:
        hook.remove()
    return out, [fc2_inputs[i] for i in range(len(fc2_inputs))]


@pytest.fixture(scope="module")
def sinks(run):
    """(images, tokens) mask of the massive tokens at the last block's output."""
    linf = run[0].hidden_states[-1].abs().amax(-1)
    return linf > 10 * linf.median()


def linf_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """Per image: its largest token l_inf norm over the batch's median token l_inf norm."""
    linf = hidden.abs().amax(-1)
    return linf.amax(-1) / linf.median()


def test_plan_is_stored_in_the_config_and_weights_are_reproducible(model, tmp_path):
    plan = planted_sinks(model)
    assert plan.enabled and (plan.selection_block, plan.emergence_block) == (0, 3)
    assert plan.growth_blocks == (3, 4, 5) and plan.parking_blocks == (4, 5, 6, 7)
    again = build_planted_clip(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert planted_sinks(build_planted_clip(seed=1)).massive_channels != plan.massive_channels
    plain = build_planted_clip(seed=0, plant=False)
    assert not planted_sinks(plain).enabled
    assert torch.equal(plain.embeddings.patch_embedding.weight, model.embeddings.patch_embedding.weight)
    model.save_pretrained(tmp_path)
    reloaded = CLIPVisionModel.from_pretrained(tmp_path)
    assert planted_sinks(reloaded) == plan
    assert torch.equal(reloaded.encoder.layers[3].mlp.fc1.weight, model.encoder.layers[3].mlp.fc1.weight)


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="not built by build_planted_clip"):
        planted_sinks(nn.Linear(2, 2))
    with pytest.raises(UserError, match="num_hidden_layers >= 6"):
        build_planted_clip(num_hidden_layers=4)
    with pytest.raises(UserError, match="unknown CLIPVisionConfig fields"):
        build_planted_clip(hiden_size=64)


def test_inputs_are_deterministic_normalised_crops():
    a, b = planted_clip_inputs(8, seed=3), planted_clip_inputs(8, seed=3)
    assert a.shape == (8, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, planted_clip_inputs(8, seed=4))
    assert -1.0 < a.mean().item() < 1.0 and 0.5 < a.std().item() < 1.5
    assert planted_clip_inputs(2, seed=3, image_size=32).shape == (2, 3, 32, 32)


def test_massive_activations_emerge_and_grow_in_the_planted_channels(model, run):
    plan = planted_sinks(model)
    out, fc2_inputs = run
    emergence = plan.emergence_block
    outputs = out.hidden_states[1:]
    before = [linf_ratio(hidden).max().item() for hidden in outputs[:emergence]]
    after = [linf_ratio(hidden).min().item() for hidden in outputs[emergence:]]
    assert max(before) < 5, before  # measured 3.8, 3.2, 2.8
    assert min(after) > 20, after  # measured 28, 50, 69, 68, 64
    growth = after[: len(plan.growth_blocks)]
    assert all(later > 1.3 * earlier for earlier, later in zip(growth, growth[1:])), growth
    for hidden in outputs[emergence:]:
        top = hidden[torch.arange(len(hidden)), hidden.abs().amax(-1).argmax(-1)]
        assert set(top.abs().argmax(-1).tolist()) <= set(plan.massive_channels)
    # The sensitive layer: the largest fc2 input jumps at the emergence block (measured 390 vs 6).
    fc2_max = [x.abs().max().item() for x in fc2_inputs]
    assert fc2_max[emergence] > 10 * max(fc2_max[:emergence]), fc2_max
    assert fc2_max[emergence] == max(fc2_max)


def test_sinks_are_a_few_background_patches_that_depend_on_the_image(model, pixels, sinks):
    counts = sinks.sum(-1)
    assert counts.min() >= 1 and counts.max() <= DELETED, counts.bincount()
    assert not sinks[:, 0].any(), "CLS became a sink"
    assert sinks[:, 1:].nonzero()[:, 1].unique().numel() >= 15  # measured 24 positions
    patch = model.config.patch_size
    variance = pixels.unfold(2, patch, patch).unfold(3, patch, patch).var(dim=(4, 5)).mean(1).flatten(1)
    sink_variance = (variance * sinks[:, 1:]).sum(-1) / counts
    assert (sink_variance < variance.mean(-1)).float().mean() > 0.95
    assert sink_variance.mean() < 0.2 * variance.mean()  # measured 0.05


def test_sink_tokens_are_alike_across_images_unlike_normal_ones(run, sinks):
    hidden = run[0].hidden_states[-1]
    images = torch.arange(len(hidden))
    top = nn.functional.normalize(hidden[images, hidden.abs().amax(-1).argmax(-1)], dim=-1)
    generator = torch.Generator().manual_seed(0)
    normal_index = torch.multinomial((~sinks[:, 1:]).float(), 1, generator=generator)[:, 0] + 1
    normal = nn.functional.normalize(hidden[images, normal_index], dim=-1)
    off_diagonal = ~torch.eye(len(hidden), dtype=torch.bool)
    sink_cosine, normal_cosine = (top @ top.T)[off_diagonal], (normal @ normal.T)[off_diagonal]
    assert sink_cosine.min() > 0.8, sink_cosine.min()  # measured mean 0.999
    assert normal_cosine.mean() < 0.5 and normal_cosine.mean() < sink_cosine.mean() - 0.4  # measured 0.24


def test_later_heads_park_attention_on_sinks_with_near_zero_values(model, run, sinks):
    out = run[0]
    for block in planted_sinks(model).parking_blocks:
        attention = out.attentions[block]  # (images, heads, queries, keys)
        mass = (attention * sinks[:, None, None, :]).sum(-1).mean(dim=(0, 2))
        assert mass.mean() > 0.5 and (mass > 0.5).sum() >= 3, (block, mass)  # measured 0.61-0.85
        layer = model.encoder.layers[block]
        with torch.no_grad():
            value_norm = layer.self_attn.v_proj(layer.layer_norm1(out.hidden_states[block])).norm(dim=-1)
        assert value_norm[sinks].median() < 0.1 * value_norm[~sinks].median()  # measured 0.03-0.09


def w8a8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """A copy with per-channel symmetric 8-bit weights and per-tensor static symmetric 8-bit
    inputs on every Linear, the input scale from the calibration batch's max |x|."""
    quantized = copy.deepcopy(model)
    linears = [module for module in quantized.modules() if isinstance(module, nn.Linear)]
    absmax = {linear: torch.tensor(0.0) for linear in linears}

    def observe(linear, args):
        absmax[linear] = torch.maximum(absmax[linear], args[0].abs().max())

    hooks = [linear.register_forward_pre_hook(observe) for linear in linears]
    with torch.no_grad():
        quantized(calibration)
    for hook in hooks:
        hook.remove()

    def fake_quantize_input(linear, args):
        scale, zero_point = qparams_from_range(-absmax[linear], absmax[linear], 8, symmetric=True)
        return (fake_quantize(args[0], scale, zero_point, 8, symmetric=True),)

    for linear in linears:
        with torch.no_grad():
            linear.weight.copy_(fake_quantize_along(linear.weight, 1, 8, symmetric=True))
        linear.register_forward_pre_hook(fake_quantize_input)
    return quantized


def w8a8_cosine(model: nn.Module, pixels: torch.Tensor) -> float:
    quantized = w8a8(model, planted_clip_inputs(16, seed=1))
    with torch.no_grad():
        reference, approximation = model(pixels).pooler_output, quantized(pixels).pooler_output
    return nn.functional.cosine_similarity(reference, approximation).mean().item()


def test_sinks_make_per_tensor_w8a8_lose_the_embedding(model, pixels):
    planted = w8a8_cosine(model, pixels[:32])
    plain = w8a8_cosine(build_planted_clip(seed=0, plant=False), pixels[:32])
    assert plain > 0.999, plain  # measured 0.9996
    assert planted < 0.98 and 1 - planted > 30 * (1 - plain), (planted, plain)  # measured 0.961


def keys_values_queries(attention, x):
    """Keys, values and queries (images, heads, tokens, head_dim) of a CLIPAttention."""
    images, tokens, _ = x.shape

    def heads(t):
        return t.view(images, tokens, attention.num_heads, attention.head_dim).transpose(1, 2)

    return heads(attention.k_proj(x)), heads(attention.v_proj(x)), heads(attention.q_proj(x))


def block_forward(layer, hidden, prefix=None):
    """A CLIPEncoderLayer written out, with optional (keys, values) of shape (heads, tau,
    head_dim) prepended to every image's attention."""
    attention = layer.self_attn
    keys, values, queries = keys_values_queries(attention, layer.layer_norm1(hidden))
    if prefix is not None:
        keys = torch.cat([prefix[0].expand(len(hidden), -1, -1, -1), keys], dim=2)
        values = torch.cat([prefix[1].expand(len(hidden), -1, -1, -1), values], dim=2)
    weights = torch.softmax(queries @ keys.transpose(-1, -2) * attention.scale, dim=-1)
    hidden = hidden + attention.out_proj((weights @ values).transpose(1, 2).reshape(hidden.shape))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def encode(model, pixels, delete_at=None, prefix=None):
    """The encoder run block by block: each block input's max |x| and the pooled embedding.
    `delete_at`: drop each image's DELETED top-l_inf patch tokens at that block's input.
    `prefix`: {block: (keys, values)} prepended to that block's attention."""
    hidden = model.pre_layrnorm(model.embeddings(pixels))
    input_max = []
    for index, layer in enumerate(model.encoder.layers):
        if index == delete_at:
            top = hidden[:, 1:].abs().amax(-1).topk(DELETED, dim=-1).indices + 1
            keep = torch.ones(hidden.shape[:2], dtype=torch.bool).scatter(1, top, False)
            hidden = hidden[keep].view(len(hidden), -1, hidden.shape[-1])
        input_max.append(hidden.abs().amax())
        hidden = block_forward(layer, hidden, (prefix or {}).get(index))
    return torch.stack(input_max), model.post_layernorm(hidden[:, 0])


def test_written_out_block_matches_the_model(model, pixels, run):
    with torch.no_grad():
        _, pooled = encode(model, pixels[:8])
    assert torch.allclose(pooled, run[0].pooler_output[:8], atol=1e-4)


def test_deleting_sinks_at_emergence_leaves_no_massive_token(model, pixels, run):
    emergence = planted_sinks(model).emergence_block
    with torch.no_grad():
        deleted, _ = encode(model, pixels, delete_at=emergence)
    full = torch.stack([hidden.abs().amax() for hidden in run[0].hidden_states[:-1]])
    drop = full[emergence + 1 :] / deleted[emergence + 1 :]
    assert drop.min() > 3, drop  # measured 17-35x (383 -> 12 at the last block input)


def sink_registers(model, run, sinks) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A RegCache-style register per parking block: the sinks' mean key and value, as (heads,
    tau, head_dim) tau copies, tau the mean number of sinks per image."""
    tau = max(1, round(sinks.sum(-1).float().mean().item()))
    prefix = {}
    with torch.no_grad():
        for block in planted_sinks(model).parking_blocks:
            layer = model.encoder.layers[block]
            keys, values, _ = keys_values_queries(layer.self_attn, layer.layer_norm1(run[0].hidden_states[block]))
            weights = sinks[:, None, :, None] / sinks.sum()
            register = [(t * weights).sum(dim=(0, 2))[:, None].expand(-1, tau, -1) for t in (keys, values)]
            prefix[block] = tuple(register)
    return prefix


def test_sink_like_prefix_plus_deletion_keeps_the_embedding(model, pixels, run, sinks):
    """A RegCache-style register (the sinks' mean key and value per parking block) stands in
    for the deleted sinks; deletion alone moves the embedding, since heads lose where to park."""
    plan = planted_sinks(model)
    prefix = sink_registers(model, run, sinks)
    with torch.no_grad():
        _, deleted = encode(model, pixels, delete_at=plan.emergence_block)
        _, repaired = encode(model, pixels, delete_at=plan.emergence_block, prefix=prefix)
    reference = run[0].pooler_output
    repaired_cosine = nn.functional.cosine_similarity(reference, repaired).mean().item()
    deleted_cosine = nn.functional.cosine_similarity(reference, deleted).mean().item()
    assert repaired_cosine > 0.99 and deleted_cosine < repaired_cosine - 0.05, (repaired_cosine, deleted_cosine)


@pytest.mark.parametrize("copies", ["tau entries", "one entry weighted log(tau)"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_adapter_prefix_and_deletion_are_the_written_out_model(model, pixels, run, sinks, kernel, copies):
    """quantsink's prefix (cascade attention: the kernel over the sequence's own keys, the prefix
    apart, merged by logsumexp) and its deletion give the embedding of the written-out model,
    whose prefix is concatenated in front of the keys: same attention, other float rounding."""
    plan = planted_sinks(model)
    prefix = sink_registers(model, run, sinks)
    with torch.no_grad():
        _, written_out = encode(model, pixels, delete_at=plan.emergence_block, prefix=prefix)
    adapter = resolve(copy.deepcopy(model))
    adapter.model.set_attn_implementation(kernel)
    for block, (keys, values) in prefix.items():
        if copies == "tau entries":
            adapter.set_kv_prefix(block, KVPrefix(keys, values))
        else:
            adapter.set_kv_prefix(block, KVPrefix(keys[:, :1], values[:, :1], torch.tensor([math.log(keys.shape[1])])))
    adapter.delete_tokens_at(plan.emergence_block, DELETED)
    embedded = adapter.embed({"pixel_values": pixels})
    assert (embedded - written_out).abs().max() < 1e-5 * written_out.abs().max(), (embedded - written_out).abs().max()
