"""RegCache: the adapter-level sequence edits on every vision family, and the method on the
planted-sink CLIP fixture, end to end through the CLI."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import quantsink
from quantsink.pipeline import quantize_as_recipe
from quantsink import cli
from quantsink.calibration import StatisticsCollector
from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.evaluate import embed_batches, fidelity
from quantsink.exports.folder import load_adapter
from quantsink.methods.regcache import RegCacheSettings, install
from quantsink.models import resolve, save_model
from quantsink.models.attention import EDITS_ATTRIBUTE, AttentionEdits, KVPrefix, attend, sdpa_with_logsumexp
from quantsink.models.base import hidden_states_of
from quantsink.models.deletion import take_tokens
from quantsink.recipe import Recipe
from quantsink.testing.planted_clip import build_planted_clip, planted_sinks
from quantsink.testing.tiny import TINY_FAMILIES, build_tiny

VISION_FAMILIES = [family for family in TINY_FAMILIES if family != "hf-bert-text"]
PLANTED_RECIPE = Path(__file__).parents[2] / "recipes" / "planted-clip-w8a8-regcache.yaml"


@pytest.fixture(scope="module")
def images():
    return load_samples("bundled", "image", 4, 1, seed=0).calibration


def prefix_everywhere(adapter, log_weight: float, scale: float) -> None:
    """Two prefix entries per attention, with large keys and values: whatever attention they get shows."""
    generator = torch.Generator().manual_seed(0)
    for block in range(adapter.num_blocks):
        heads, head_dim = 4, 16  # tiny models: width 64 in 4 heads
        keys = torch.randn(heads, 2, head_dim, generator=generator) * scale
        values = torch.randn(heads, 2, head_dim, generator=generator) * scale
        adapter.set_kv_prefix(block, KVPrefix(keys, values, torch.full((2,), log_weight)))


def use_eager_attention(adapter) -> None:
    """The family's non-fused attention: transformers' eager kernel, timm's written-out softmax."""
    if adapter.family == "timm-vit":
        for block in adapter.model.blocks:
            block.attn.fused_attn = False
    else:
        adapter.model.set_attn_implementation("eager")


def padded_if_naflex(family, images):
    """SigLIP 2 NaFlex gets 5x3-patch images, so one of its 16 positions is padding (masked)."""
    return [image.resize((30, 70)) for image in images] if family == "hf-siglip2" else images


@pytest.mark.parametrize("family, kernel", [(family, "default") for family in VISION_FAMILIES]
                         + [("hf-clip", "eager"), ("hf-siglip2", "eager"), ("timm-vit", "eager")])
def test_sequence_edits_change_nothing_when_they_do_nothing(family, kernel, images):
    adapter = build_tiny(family)
    if kernel == "eager":
        use_eager_attention(adapter)
    inputs = adapter.preprocess(padded_if_naflex(family, images))
    plain = adapter.embed(inputs)

    # the search's cache: running from a block on its cached input is the model itself, bit for bit
    cached = adapter.hidden_before(2, inputs)
    assert torch.equal(adapter.run_from(2, cached, inputs), plain)
    assert torch.equal(adapter.hidden_before(3, inputs, resume=(2, cached)), adapter.hidden_before(3, inputs))

    # deleting zero tokens runs the deletion (top-0, gather) and changes nothing, bit for bit
    deletion = adapter.delete_tokens_at(1, 0)
    assert torch.equal(adapter.embed(inputs), plain)
    assert deletion.kept.shape[1] == deletion.length
    deletion.remove()

    # registers whose attention weight is forced to zero (log weight -inf) change nothing, bit for
    # bit, although their keys and values are huge: the kernel runs over the sequence's own keys
    # as without them, and the cascade merge gives the prefix a share of exactly 0
    prefix_everywhere(adapter, log_weight=float("-inf"), scale=1e3)
    assert torch.equal(adapter.embed(inputs), plain)
    prefix_everywhere(adapter, log_weight=0.0, scale=1.0)  # the same path with weight: it does act
    seen = []
    with adapter.observing_kv([0], lambda _block, keys, values: seen.append(keys.shape[-2])):
        assert (adapter.embed(inputs) - plain).abs().max() > 1e-2 * plain.abs().max()
    assert seen == [cached.shape[1]]  # observers see the sequence's own keys, not the prefix
    for block in range(adapter.num_blocks):
        adapter.set_kv_prefix(block, None)
    assert torch.equal(adapter.embed(inputs), plain)

    # registers live outside the state_dict
    assert not any("quantsink" in key for key in adapter.model.state_dict())


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip2", "timm-vit"])
def test_prefixed_embedding_is_the_same_under_eager_and_fused_attention(family, images):
    """The logsumexp of the sequence's own logits comes from the fused kernel (SDPA) or from the
    eager kernel's softmax: both merge to the same prefixed attention."""
    embeddings = []
    for kernel in ("default", "eager"):
        adapter = build_tiny(family)
        if kernel == "eager":
            use_eager_attention(adapter)
        prefix_everywhere(adapter, log_weight=math.log(3), scale=1.0)
        embeddings.append(adapter.embed(adapter.preprocess(padded_if_naflex(family, images))))
    assert (embeddings[0] - embeddings[1]).abs().max() <= 1e-5 * embeddings[0].abs().max()


# --- cascade attention against attention over the concatenated keys ----------------------------
def attention_inputs(mask_kind: str):
    """Query, keys, values (batch 3, heads 2, 7 tokens, head_dim 8), a mask of `mask_kind` that
    hides the last two keys of the second sequence (padding), and a 3-entry prefix weighted as
    3 copies, 1 copy and none."""
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(3, 2, 7, 8, generator=generator) for _ in range(3))
    visible = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    visible[1, ..., 5:] = False
    mask = {"none": None, "bool": visible,
            "additive": torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)}[mask_kind]
    prefix = KVPrefix(torch.randn(2, 3, 8, generator=generator) * 2, torch.randn(2, 3, 8, generator=generator),
                      torch.tensor([math.log(3), 0.0, float("-inf")]))
    return query, keys, values, mask, prefix


def own_attention(kernel: str, query: torch.Tensor, scale: float):
    def eager(keys, values, mask):
        logits = query @ keys.transpose(-2, -1) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        return logits.softmax(dim=-1) @ values

    def sdpa(keys, values, mask):
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)

    return eager if kernel == "eager" else sdpa


def concatenated_attention(query, keys, values, mask, prefix, scale):
    """The prefix written in front of every sequence's keys and values, in float64."""
    own = torch.zeros(1, 1, 1, keys.shape[-2], dtype=torch.float64)
    if mask is not None:
        own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask
    batch = len(query)
    keys = torch.cat([prefix.keys.expand(batch, -1, -1, -1), keys], dim=-2).double()
    values = torch.cat([prefix.values.expand(batch, -1, -1, -1), values], dim=-2).double()
    logits = query.double() @ keys.transpose(-2, -1) * scale
    bias = torch.cat([prefix.log_weights.double().expand(*logits.shape[:-1], -1), own.expand(*logits.shape[:-1], -1)], dim=-1)
    return ((logits + bias).softmax(dim=-1) @ values).float()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa", "sdpa-math"])
def test_cascade_prefix_is_attention_over_the_concatenated_keys(kernel, mask_kind):
    query, keys, values, mask, prefix = attention_inputs(mask_kind)
    scale = 0.3  # not SDPA's default: the prefix logits must use the kernel's own scale
    module = nn.Module()
    setattr(module, EDITS_ATTRIBUTE, AttentionEdits(prefix=prefix))
    attention = own_attention("eager" if kernel == "eager" else "sdpa", query, scale)
    with sdpa_kernel(SDPBackend.MATH if kernel == "sdpa-math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        if kernel != "eager":  # which of sdpa_with_logsumexp's two ways this case takes
            expected_backend = SDPBackend.MATH if kernel == "sdpa-math" else SDPBackend.FLASH_ATTENTION
            assert SDPBackend(torch._fused_sdp_choice(query, keys, values, mask, scale=scale)) == expected_backend
        cascade = attend(module, query, keys, values, mask, scale, attention)
        reference = concatenated_attention(query, keys, values, mask, prefix, scale)
        assert (cascade - reference).abs().max() < 1e-5
        # with every entry weighted out the output is the kernel's, bit for bit
        prefix.log_weights = torch.full((3,), float("-inf"))
        assert torch.equal(attend(module, query, keys, values, mask, scale, attention), attention(keys, values, mask))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
def test_sdpa_with_logsumexp_gives_the_kernel_output_bit_for_bit(backend, mask_kind):
    query, keys, values, mask, _ = attention_inputs(mask_kind)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)  # transformers' strides
    with sdpa_kernel(backend):
        output, logsumexp = sdpa_with_logsumexp(query, keys, values, attn_mask=mask, scale=0.3)
        assert torch.equal(output, F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=0.3))
    logits = query.double() @ keys.double().transpose(-2, -1) * 0.3
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    assert (logsumexp - logits.logsumexp(dim=-1)).abs().max() < 1e-5


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_deletion_drops_the_largest_tokens_never_the_leading_ones(family, images):
    adapter = build_tiny(family)
    inputs = adapter.preprocess(images)
    block = 1
    entering = adapter.hidden_before(block, inputs)
    seen = {}
    deletion = adapter.delete_tokens_at(block, 3, refill="neighbours")
    adapter.blocks()[block].register_forward_pre_hook(lambda _m, args: seen.__setitem__("input", args[0]))
    adapter.blocks()[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("output", out))
    adapter.embed(inputs)
    lead = adapter.num_prefix_tokens
    batch, length, _ = entering.shape
    assert seen["input"].shape[1] == length - 3 and seen["output"].shape[1] == length  # refilled
    assert torch.equal(deletion.kept[:, :lead], torch.arange(lead).expand(batch, -1))
    dropped = torch.ones(batch, length, dtype=torch.bool).scatter(1, deletion.kept, False)
    norms = entering.abs().amax(-1)[:, lead:]
    assert torch.equal(norms.topk(3, dim=-1).indices.sort().values + lead, dropped.nonzero()[:, 1].view(batch, 3))


def test_siglip2_deletion_keeps_padding_and_the_pooling_mask_in_step(images):
    adapter = build_tiny("hf-siglip2")
    inputs = adapter.preprocess([image.resize((30, 70)) for image in images])  # 5x3 patches + 1 padding
    assert (inputs["pixel_attention_mask"].sum(-1) < inputs["pixel_attention_mask"].shape[1]).all()
    plain = adapter.embed(inputs)
    deletion = adapter.delete_tokens_at(1, 0)
    assert torch.equal(adapter.embed(inputs), plain)
    deletion.remove()
    deletion = adapter.delete_tokens_at(1, 4, refill="neighbours")
    out = adapter.model(**inputs)
    assert out.last_hidden_state.shape[1] == inputs["pixel_attention_mask"].shape[1]
    padding = (inputs["pixel_attention_mask"] == 0).nonzero()
    assert all(int(position) in deletion.kept[image].tolist() for image, position in padding)


@pytest.mark.parametrize("refill", ["none", "neighbours"])
def test_statistics_follow_a_token_deletion_past_siglip2_padding(refill, images):
    """Regression: calibration statistics applied the input's token mask to every block output,
    which a deletion had shortened (IndexError on SigLIP 2, whose token mask marks padding)."""
    adapter = build_tiny("hf-siglip2")
    inputs = adapter.preprocess(padded_if_naflex("hf-siglip2", images))
    real = adapter.token_mask(inputs)
    outputs = {}
    for index, block in enumerate(adapter.blocks()):
        block.register_forward_hook(lambda _m, _a, output, index=index: outputs.__setitem__(index, hidden_states_of(output)))
    deletion = adapter.delete_tokens_at(1, 3, refill=refill)
    collector = StatisticsCollector(adapter)
    with collector.attached():
        collector.collect([inputs])
    stats = collector.result()
    for block in range(adapter.num_blocks):
        shortened = 1 <= block and refill == "none"
        kept = take_tokens(real, deletion.kept, 1) if shortened else real
        assert [len(norms) for norms in stats.token_linf[block]] == [15 - 3 * shortened] * len(images)
        for norms, hidden, keep in zip(stats.token_linf[block], outputs[block], kept):
            assert torch.equal(norms, hidden.abs().amax(-1)[keep])
    deletion.remove()
    assert torch.equal(adapter.block_output_tokens(2, real), real)


def test_options_are_validated_with_their_field():
    for options, message in [
        ({"num_registers": 16}, r"methods\.0\.regcache\.num_registers: expected 'auto' or an integer 0-15, got 16"),
        ({"prefix_blocks": "first"}, r"methods\.0\.regcache\.prefix_blocks: "),
        ({"validation_fraction": 1.0}, r"methods\.0\.regcache\.validation_fraction: "),
        ({"delete_tokens": 11}, r"methods\.0\.regcache\.delete_tokens: expected 'auto' or an integer 0-10"),
        ({"refill": "both"}, r"methods\.0\.regcache\.refill: "),
        ({"prefix_start": "early"}, r"methods\.0\.regcache\.prefix_start: expected 'auto' or an integer >= 0"),
        ({"registers": 3}, r"methods\.0\.regcache\.registers: unknown field"),
    ]:
        with pytest.raises(UserError, match=message):
            Recipe.from_dict({"methods": [{"regcache": options}]})


def test_text_models_are_refused():
    adapter = build_tiny("hf-bert-text")
    with pytest.raises(UserError, match="regcache applies to vision encoders"):
        quantsink.quantize(adapter.model, {"methods": [{"regcache": {}}]}, progress=False)
    with pytest.raises(UserError, match="cannot be deleted from a sentence encoder"):
        adapter.delete_tokens_at(1, 2)


# --- the planted-sink fixture, through the CLI with every hyperparameter searched ------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The CLI run of the planted recipe; the in-memory result is taken from the API call the CLI makes."""
    folder = tmp_path_factory.mktemp("planted") / "planted-clip"
    save_model(resolve(build_planted_clip(seed=0)), folder)
    out = folder.parent / "out"
    results = []
    real_quantize = quantsink.api.quantize
    patch = pytest.MonkeyPatch()
    patch.setattr(quantsink.api, "quantize", lambda *args, **kwargs: results.append(real_quantize(*args, **kwargs)) or results[-1])
    try:
        assert cli.main(["quantize", str(folder), str(PLANTED_RECIPE), "-o", str(out), "--quiet"]) == 0
    finally:
        patch.undo()
    recipe = Recipe.from_yaml(PLANTED_RECIPE)
    settings = recipe.calibration
    samples = load_samples(settings.data, "image", settings.num_samples, settings.holdout, settings.seed)
    fp = resolve(str(folder))
    holdout = [fp.preprocess(batch) for batch in batched(samples.holdout, settings.batch_size)]
    calibration = [fp.preprocess(batch) for batch in batched(samples.calibration, settings.batch_size)]
    return {"folder": folder, "out": out, "result": results[0], "recipe": recipe, "holdout": holdout,
            "calibration": calibration, "reference": embed_batches(fp, holdout)}


def quantized_holdout(planted, settings) -> torch.Tensor:
    """Holdout embeddings of the planted model with `settings` of the searched RegCache installed
    (None: none), then quantized as the pipeline does it: the recipe's backend, prepared after the
    method, calibrated on the recipe's calibration set, frozen."""
    adapter = resolve(str(planted["folder"]))
    if settings is not None:
        install(adapter, settings, planted["result"].methods[0].registers)
    quantize_as_recipe(adapter, planted["recipe"].quantization, planted["calibration"])
    return embed_batches(adapter, planted["holdout"])


@pytest.mark.slow
def test_cli_search_reloads_exactly_and_reports_its_cost(planted):
    result = planted["result"]
    report = result.report["methods"]["regcache"]
    assert report["sensitive_layer"] == planted_sinks(build_planted_clip(seed=0)).emergence_block
    assert set(report["searched"]) == {"sensitive_layer", "prefix_start", "num_registers", "delete_tokens"}
    # wall-clock cost is a benchmark figure (benchmarks/RESULTS.md), not a timed assertion:
    # the report must carry it in calibration passes
    assert report["cost"]["seconds"] > 0 and report["cost"]["reference_passes"] > 0
    loaded = load_adapter(planted["out"])
    assert not any("quantsink" in key for key in loaded.model.state_dict())
    for inputs in planted["holdout"]:
        assert torch.equal(loaded.embed(inputs), result.adapter.embed(inputs))


@pytest.mark.slow
def test_cli_report_gives_every_variant_on_the_validation_split(planted):
    report = planted["result"].report["methods"]["regcache"]
    validation = report["validation"]
    for variant in ("naive", "prefix-only", "delete-only", "both"):
        assert RegCacheSettings(**validation[variant]["settings"]).variant == variant
    printed = cli.format_summary(planted["result"].report, planted["out"])
    assert "validation centred cosine (16 images): naive" in printed and "chosen" in printed


@pytest.mark.slow
def test_both_parts_beat_naive_and_either_part_alone_each_tuned_on_its_own_at_w8a8(planted):
    """Only deletion can stop this fixture's sinks (they are planted in block 0), yet the pair wins:
    the registers give the later heads the sink the deletion took away."""
    validation = planted["result"].report["methods"]["regcache"]["validation"]
    settings = planted["result"].methods[0].settings
    assert settings.variant == "both"
    centered = lambda embeddings: fidelity(planted["reference"], embeddings)["centered_cosine_mean"]
    both = centered(embed_batches(planted["result"].adapter, planted["holdout"]))
    others = {variant: centered(quantized_holdout(planted, RegCacheSettings(**validation[variant]["settings"])))
              for variant in ("naive", "prefix-only", "delete-only")}
    assert both > max(others.values()), (both, others)
    assert 1 - both < 0.25 * (1 - max(others.values())), (both, others)


@pytest.mark.slow
def test_max_token_norm_at_the_sensitive_layer_drops_3x(planted):
    """The sensitive layer is block l_q's fc2: its input is where the sinks' massive values sit."""
    method = planted["result"].methods[0]
    images = planted["holdout"][:2]
    maxima = []
    for with_regcache in (False, True):
        adapter = resolve(str(planted["folder"]))
        if with_regcache:
            install(adapter, method.settings, method.registers)
        largest = []
        adapter.fc2(method.settings.sensitive_layer).register_forward_pre_hook(lambda _m, args: largest.append(args[0].abs().max()))
        embed_batches(adapter, images)
        maxima.append(max(largest).item())
    assert maxima[0] > 3 * maxima[1], maxima
