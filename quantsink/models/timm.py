"""Adapter for timm Vision Transformers (`timm.models.vision_transformer.VisionTransformer`).

timm's attention keeps a fused `qkv` nn.Linear and calls it, so quantizers need no rewriting. The
embedding is the pre-logits feature: `forward_head(forward_features(x), pre_logits=True)`.
An attention that gets quantsink edits (key/value prefix, observers) becomes an
`EditableAttention` in place: same parameters and names, a forward that hands keys and values over.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_model_data_config
from timm.layers import Attention, LayerScale
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from quantsink.errors import ModelLoadError, UserError
from quantsink.models.attention import attend
from quantsink.models.base import ModelSource, register_adapter
from quantsink.models.editable import EditableEncoderAdapter
from quantsink.models.hub import hub_file

logger = logging.getLogger(__name__)


class EditableAttention(Attention):
    """timm's Attention that runs its attention, after the key norm, through `attend`. Without
    edits it computes exactly what Attention computes."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, length, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        def own_attention(k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
            if self.fused_attn:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
                )
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(length, attn, attn_mask, is_causal))
            return self.attn_drop(attn.softmax(dim=-1)) @ v

        x = attend(self, q, k, v, attn_mask, self.scale, own_attention)
        x = self.norm(x.transpose(1, 2).reshape(batch, length, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register_adapter
class TimmViTAdapter(EditableEncoderAdapter):
    """Config: {"model_name": a timm name, "kwargs": create_model overrides, "data_config": the
    eval transform's settings (optional: resolved from the model when absent)}."""

    family = "timm-vit"
    modality = "image"

    def __init__(self, model: nn.Module, source: ModelSource):
        super().__init__(model, source)
        self.transform = create_transform(**source.config["data_config"])

    # --- construction -------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer) and all(
            isinstance(getattr(block.mlp, name, None), nn.Linear) for block in model.blocks for name in ("fc1", "fc2")
        )

    @classmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>") -> "TimmViTAdapter":
        if not cls.handles(model):
            raise ModelLoadError(
                f"{type(model).__name__} is not a timm VisionTransformer with an fc1/fc2 MLP: it is not supported"
            )
        # a VisionTransformer built by hand has no pretrained_cfg: its kwargs then override the base ViT
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture", "vit_base_patch16_224")
        config = {"model_name": architecture, "kwargs": _describe(model)}
        _check_rebuildable(model, config)
        return cls(model, ModelSource(cls.family, spec, {**config, "data_config": _data_config(model)}))

    @classmethod
    def from_config(cls, config: dict[str, Any], assets_dir: Path | None = None) -> "TimmViTAdapter":
        model = timm.create_model(config["model_name"], pretrained=False, **config.get("kwargs", {}))
        config = {**config, "data_config": config.get("data_config") or _data_config(model)}
        return cls(model, ModelSource(cls.family, "<config>", config))

    @classmethod
    def from_pretrained(cls, name: str, spec: str) -> "TimmViTAdapter":
        """Load timm model `name` (optionally `arch.tag`) with its weights from the hub cache."""
        try:
            pretrained = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # a known architecture with an unknown tag
            pretrained = None
        if pretrained is None:
            close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ModelLoadError(f"timm has no pretrained model {name!r}: {hint}see timm.list_models(pretrained=True)")
        with torch.device("meta"):  # the architecture alone, to refuse non-ViTs before fetching weights
            if not cls.handles(timm.create_model(name, pretrained=False)):
                raise ModelLoadError(f"timm {name} is not a VisionTransformer with an fc1/fc2 MLP: it is not supported")
        filename = pretrained.hf_hub_filename or "model.safetensors"
        if not pretrained.hf_hub_id or not filename.endswith(".safetensors"):
            raise ModelLoadError(
                f"{spec} has no safetensors weights on the Hugging Face hub: quantsink reads only safetensors"
            )
        checkpoint = hub_file(spec, pretrained.hf_hub_id, filename)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)})
        logger.info("loaded %s", spec)
        config = {"model_name": name, "kwargs": {}, "data_config": _data_config(model)}
        return cls(model, ModelSource(cls.family, spec, config))

    # --- structure ----------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def attention(self, block_index: int) -> nn.Module:
        return self.model.blocks[block_index].attn

    def fc1(self, block_index: int) -> nn.Linear:
        return self.model.blocks[block_index].mlp.fc1

    def fc2(self, block_index: int) -> nn.Linear:
        return self.model.blocks[block_index].mlp.fc2

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens  # class token + registers

    def patch_embedding(self) -> nn.Module:
        return self.model.patch_embed.proj

    def _editable_attention(self, block_index: int) -> EditableAttention:
        attention = self.attention(block_index)
        if type(attention) is Attention:
            attention.__class__ = EditableAttention  # same module, same state_dict: only forward changes
        if not isinstance(attention, EditableAttention):
            raise UserError(f"quantsink cannot edit timm's {type(attention).__name__}: only timm.layers.Attention")
        return attention

    # --- data ---------------------------------------------------------------------------
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        # timm's eval transform expects RGB and, unlike transformers and open_clip, does not convert
        return {"pixel_values": torch.stack([self.transform(image.convert("RGB")) for image in samples])}

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(inputs["pixel_values"]), pre_logits=True)


def _data_config(model: VisionTransformer) -> dict[str, Any]:
    """The eval transform's settings; the input size is the model's own, since a model built with
    another img_size than its pretrained default keeps the default's pretrained_cfg."""
    config = resolve_model_data_config(model)
    config["input_size"] = [config["input_size"][0], *model.patch_embed.img_size]
    return {name: list(value) if isinstance(value, tuple) else value for name, value in config.items()}


def _describe(model: VisionTransformer) -> dict[str, Any]:
    """create_model overrides that rebuild `model`'s shapes on top of its named architecture;
    initial values it does not record (layer-scale init) are overwritten by loaded weights."""
    block = model.blocks[0]
    return {
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": 1.0 if isinstance(block.ls1, LayerScale) else None,
        "class_token": model.has_class_token,
        "reg_tokens": model.num_reg_tokens,
        "no_embed_class": model.no_embed_class,
        "global_pool": model.global_pool,
        "num_classes": model.num_classes,
        "dynamic_img_size": model.dynamic_img_size,
    }


def _check_rebuildable(model: nn.Module, config: dict[str, Any]) -> None:
    try:
        with torch.device("meta"):
            probe = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"])
        rebuilt = _shapes(probe) == _shapes(model)
    except (TypeError, ValueError, RuntimeError, AssertionError):
        rebuilt = False
    if not rebuilt:
        raise ModelLoadError(
            f"quantsink cannot describe this {config['model_name']} well enough to rebuild it from a saved folder: "
            "load it with timm:NAME instead"
        )


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
