"""Model adapters: every family's tiny model, the spec forms of `resolve`, saving and reloading,
the open_clip attention rewrite, and the real all-MiniLM-L6-v2 against sentence-transformers."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it; the fixture below covers late imports

import open_clip
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from timm.layers import Attention as TimmAttention
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.models.siglip2.modeling_siglip2 import Siglip2Attention

from quantsink import io
from quantsink.errors import ModelLoadError, UserError
from quantsink.models import catalog, resolve, save_model
from quantsink.models.base import hidden_states_of
from quantsink.models.catalog import SHORT_NAMES
from quantsink.models.open_clip import SplitMultiheadAttention, split_attention
from quantsink.testing.tiny import TINY_CAUSAL_LMS, TINY_FAMILIES, build_tiny, build_tiny_causal_lm

ATTENTION = {
    "hf-clip": CLIPAttention,
    "hf-siglip": SiglipAttention,
    "hf-siglip2": Siglip2Attention,
    "hf-dinov2": Dinov2Attention,
    "open-clip": SplitMultiheadAttention,
    "timm-vit": TimmAttention,
    "hf-bert-text": BertSelfAttention,
}
PREFIX_TOKENS = {
    "hf-clip": 1, "hf-siglip": 0, "hf-siglip2": 0, "hf-dinov2": 1, "open-clip": 1, "timm-vit": 5, "hf-bert-text": 1
}
PATCHES = (32 // 8) ** 2
TEXTS = [
    "A man is eating food.",
    "Quantization of vision transformers needs prefixing registers.",
    "Massive activations appear in a few fixed channels.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; `add(repo_id, files)` fills one repository as `hf download` would."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id, writer):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        writer(snapshot)

    return add


@pytest.fixture(scope="module")
def images():
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.camera()]  # the last one is grayscale
    return [Image.fromarray(photo).resize((64, 48)) for photo in photos]


def samples_for(adapter, images):
    return TEXTS if adapter.modality == "text" else images


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_embeds_deterministically_and_exposes_its_structure(family, images):
    adapter = build_tiny(family)
    samples = samples_for(adapter, images)
    inputs = adapter.preprocess(samples)
    embedding = adapter.embed(inputs)

    assert embedding.ndim == 2 and embedding.shape[0] == len(samples)
    assert torch.isfinite(embedding).all() and embedding.std() > 0
    assert torch.equal(embedding, build_tiny(family).embed(inputs))
    assert not torch.equal(embedding, build_tiny(family, seed=1).embed(inputs))

    assert len(adapter.blocks()) == adapter.num_blocks == 4
    for index in range(4):
        assert isinstance(adapter.attention(index), ATTENTION[family])
        fc1, fc2 = adapter.fc1(index), adapter.fc2(index)
        assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
        assert fc1.in_features == fc2.out_features == 64 and fc1.out_features == fc2.in_features == 256
    assert adapter.num_prefix_tokens == PREFIX_TOKENS[family]
    assert len(set(adapter.block_names())) == 4


@pytest.mark.parametrize("family", [family for family in TINY_FAMILIES if family != "hf-bert-text"])
def test_block_outputs_are_prefix_tokens_then_patches(family, images):
    adapter = build_tiny(family)
    seen = []
    hook = adapter.blocks()[0].register_forward_hook(lambda module, args, output: seen.append(hidden_states_of(output)))
    try:
        inputs = adapter.preprocess(images)
        adapter.embed(inputs)
    finally:
        hook.remove()
    assert seen[0].shape == (len(images), adapter.num_prefix_tokens + PATCHES, 64)
    mask = adapter.token_mask(inputs)
    if family == "hf-siglip2":
        # the 64x48 images fill 4x3 of SigLIP 2's at most 16 patches: the rest is padding
        assert mask.dtype == torch.bool and mask.shape == (len(images), PATCHES)
        assert mask.sum(dim=1).tolist() == [12] * len(images)
    else:
        assert mask is None


def test_text_token_mask_is_the_attention_mask():
    adapter = build_tiny("hf-bert-text")
    inputs = adapter.preprocess(["short", "a somewhat longer sentence than the first"])
    mask = adapter.token_mask(inputs)
    assert mask.dtype == torch.bool and torch.equal(mask, inputs["attention_mask"].bool())
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_model_then_resolve_gives_identical_embeddings(family, tmp_path, images):
    adapter = build_tiny(family)
    folder = save_model(adapter, tmp_path / "saved")
    manifest = json.loads((folder / io.MANIFEST).read_text())
    assert manifest["quantization"] is None and manifest["format_version"] == io.FORMAT_VERSION

    reloaded = resolve(str(folder))
    samples = samples_for(adapter, images)
    assert reloaded.family == family and reloaded.source.spec == f"tiny:{family}"
    assert type(reloaded.model) is type(adapter.model)
    inputs = adapter.preprocess(samples)
    assert all(torch.equal(inputs[name], value) for name, value in reloaded.preprocess(samples).items())
    assert torch.equal(reloaded.embed(inputs), adapter.embed(inputs))
    assert list(reloaded.model.state_dict()) == list(adapter.model.state_dict())


def test_split_attention_matches_open_clip_tower():
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=8, image_size=32, ls_init_value=0.5)
    original = _build_vision_tower(32, vision, quick_gelu=True).eval()
    split = split_attention(copy.deepcopy(original))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, actual = original(pixels), split(pixels)
    assert (expected - actual).abs().max() < 1e-5
    assert not any(isinstance(module, nn.MultiheadAttention) for module in split.modules())
    keys = list(split.state_dict())
    assert "transformer.resblocks.0.attn.q_proj.weight" in keys
    assert "transformer.resblocks.0.attn.in_proj_weight" not in keys
    assert keys == list(split_attention(copy.deepcopy(original)).state_dict())


def test_split_attention_keeps_sequence_first_layout_and_boolean_masks():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=False).eval()
    split = SplitMultiheadAttention.from_torch(attention)
    query, memory = torch.randn(5, 2, 32), torch.randn(7, 2, 32)
    masked = torch.zeros(5, 7, dtype=torch.bool)
    masked[:, 4:] = True  # nn.MultiheadAttention convention: True = may not attend
    with torch.no_grad():
        expected = attention(query, memory, memory, need_weights=False, attn_mask=masked)[0]
        actual = split(query, memory, memory, need_weights=False, attn_mask=masked)[0]
    assert actual.shape == (5, 2, 32)
    assert (expected - actual).abs().max() < 1e-5


def test_open_clip_module_is_described_and_rebuilt(tmp_path, images):
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32, ls_init_value=0.1)
    tower = _build_vision_tower(16, vision, quick_gelu=True)
    original = copy.deepcopy(tower).eval()
    adapter = resolve(tower)
    assert adapter.family == "open-clip" and adapter.source.config["quick_gelu"] is True
    pixels = adapter.preprocess(images)["pixel_values"]
    with torch.no_grad():
        assert (adapter.embed({"pixel_values": pixels}) - original(pixels)).abs().max() < 1e-5
    reloaded = resolve(str(save_model(adapter, tmp_path / "saved")))
    assert torch.equal(reloaded.embed({"pixel_values": pixels}), adapter.embed({"pixel_values": pixels}))


def test_timm_module_is_described_and_rebuilt(tmp_path, images):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10, reg_tokens=2)
    adapter = resolve(model)
    assert adapter.family == "timm-vit" and adapter.num_prefix_tokens == 3
    inputs = adapter.preprocess(images)
    assert inputs["pixel_values"].shape == (len(images), 3, 32, 32)
    reloaded = resolve(str(save_model(adapter, tmp_path / "saved")))
    assert torch.equal(reloaded.embed(inputs), adapter.embed(inputs))


def test_full_clip_checkpoint_from_the_hub_cache_gives_the_projected_embedding(hub_cache, images):
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(sizes, vocab_size=49408),
        vision_config=dict(sizes, image_size=32, patch_size=8),
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    def write(folder):
        clip.save_pretrained(folder)
        processor.save_pretrained(folder)

    hub_cache("openai/clip-vit-base-patch32", write)
    adapter = resolve("clip-vit-b32")
    assert adapter.family == "hf-clip" and adapter.source.spec == "clip-vit-b32"
    assert isinstance(adapter.model, CLIPVisionModelWithProjection)
    inputs = adapter.preprocess(images)
    with torch.no_grad():
        expected = clip.get_image_features(**inputs)
    expected = getattr(expected, "pooler_output", expected)
    assert expected.shape == (len(images), 16)
    assert torch.allclose(adapter.embed(inputs), expected, atol=1e-6)


def test_clip_vision_model_folder_gives_the_pooled_output(tmp_path, images):
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )).eval()
    model.save_pretrained(tmp_path)
    adapter = resolve(str(tmp_path))
    assert type(adapter.model) is CLIPVisionModel
    inputs = adapter.preprocess(images)
    with torch.no_grad():
        assert torch.allclose(adapter.embed(inputs), model(**inputs).pooler_output, atol=1e-6)


def test_timm_name_loads_safetensors_from_the_hub_cache(hub_cache, images):
    name = "test_vit.r160_in1k"  # timm's own tiny ViT for tests
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    hub_cache(f"timm/{name}", lambda folder: save_file(reference.state_dict(), str(folder / "model.safetensors")))
    adapter = resolve(f"timm:{name}")
    assert adapter.family == "timm-vit" and adapter.num_prefix_tokens == 1
    inputs = adapter.preprocess(images[:1])
    assert inputs["pixel_values"].shape == (1, 3, 160, 160)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(inputs["pixel_values"]), pre_logits=True)
    assert torch.equal(adapter.embed(inputs), expected)


def test_open_clip_tag_loads_the_image_tower_from_the_hub_cache(hub_cache, monkeypatch, images):
    vision = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    architecture = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": {}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test", architecture)
    pretrained = {"hf_hub": "quantsink-test/tiny-open-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test", {"test": pretrained})
    torch.manual_seed(0)
    tower = _build_vision_tower(16, CLIPVisionCfg(**vision)).eval()
    checkpoint = {f"visual.{name}": tensor for name, tensor in tower.state_dict().items()}
    checkpoint["text_projection"] = torch.zeros(4, 4)  # the other tower's weights are skipped
    hub_cache(
        "quantsink-test/tiny-open-clip",
        lambda folder: save_file(checkpoint, str(folder / "open_clip_model.safetensors")),
    )

    adapter = resolve("open_clip:tiny-test/test")
    assert adapter.source.config["preprocess_cfg"]["mean"] == (0.5, 0.5, 0.5)
    pixels = adapter.preprocess(images)["pixel_values"]
    with torch.no_grad():
        assert (adapter.embed({"pixel_values": pixels}) - tower(pixels)).abs().max() < 1e-5
    with pytest.raises(ModelLoadError, match="known tags are test"):
        resolve("open_clip:tiny-test/laion")


def test_real_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    adapter = resolve("all-minilm-l6-v2")
    assert adapter.family == "hf-bert-text" and adapter.modality == "text" and len(adapter.blocks()) == 6
    sentences = TEXTS + ["a sentence longer than the model's window " * 60]
    ours = adapter.embed(adapter.preprocess(sentences))
    folder = SHORT_NAMES.get("all-minilm-l6-v2").local_folder()
    reference = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(sentences))
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    assert cosine.min() > 0.999
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)


def test_unknown_short_name_suggests_close_matches():
    with pytest.raises(ModelLoadError, match="clip-vit-b32") as caught:
        resolve("clip-vit-b23")
    assert "hf:ORG/NAME" in str(caught.value)


def test_uncached_hub_id_fails_offline_with_a_fix(hub_cache):
    for spec in ("hf:nobody-here/no-such-model", "timm:test_vit.r160_in1k", "open_clip:ViT-B-32/laion2b_s34b_b79k"):
        with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as caught:
            resolve(spec)
        assert "local folder" in str(caught.value) and "\n" not in str(caught.value)


def test_timm_name_of_another_architecture_is_refused_before_any_download(hub_cache):
    with pytest.raises(ModelLoadError, match="not a VisionTransformer"):
        resolve("timm:resnet50.a1_in1k")


def test_path_like_spec_that_is_no_folder_points_to_hf_prefix():
    with pytest.raises(ModelLoadError, match="hf:someone/some-model"):
        resolve("someone/some-model")


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither config.json"):
        resolve(str(tmp_path))


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelLoadError, match="'t5'.*clip_vision_model.*dinov2.*gpt_neox.*llama"):
        resolve(str(tmp_path))


def test_quantized_folder_points_to_quantsink_load(tmp_path):
    folder = save_model(build_tiny("hf-siglip"), tmp_path / "saved")
    manifest = json.loads((folder / io.MANIFEST).read_text())
    io.write_json(folder / io.MANIFEST, {**manifest, "quantization": {"backend": "fake"}})
    with pytest.raises(UserError, match="quantsink.load"):
        resolve(str(folder))


def test_unsupported_module_lists_the_families():
    with pytest.raises(UserError, match="hf-clip.*open-clip.*timm-vit"):
        resolve(nn.Linear(4, 4))


def test_catalog_rows_name_real_sources():
    rows = {name: (spec, family) for name, spec, family, _ in catalog()}
    assert rows["clip-vit-l"] == ("hf:openai/clip-vit-large-patch14", "hf-clip")
    assert rows["openclip-vit-h14"] == ("open_clip:ViT-H-14/laion2b_s32b_b79k", "open-clip")
    assert rows["dinov2-b"] == ("hf:facebook/dinov2-base", "hf-dinov2")
    # every family the catalog names has a tiny model the tests run (causal LMs: one per layout)
    tiny_causal_families = {build_tiny_causal_lm(model_type).family for model_type in TINY_CAUSAL_LMS}
    assert {family for _, family in rows.values()} <= set(TINY_FAMILIES) | tiny_causal_families
