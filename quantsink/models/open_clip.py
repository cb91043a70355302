"""Adapter for open_clip image towers (the `.visual` VisionTransformer of an open_clip CLIP).

open_clip's blocks attend through torch's nn.MultiheadAttention, which keeps q, k and v in one
fused parameter and reads `out_proj.weight` without ever calling `out_proj`. A quantizer that
swaps nn.Linear modules would silently miss or break it, and methods that extend keys and values
cannot reach them. So every tower this adapter holds has its attentions replaced by
`SplitMultiheadAttention`: the same computation with four explicit nn.Linear projections, which
hands its keys and values to quantsink's attention edits (prefix, observers).
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import LayerScale, QuickGELU, ResidualAttentionBlock, VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quantsink.errors import ModelLoadError, UserError
from quantsink.models.attention import attend
from quantsink.models.base import ModelSource, register_adapter
from quantsink.models.editable import EditableEncoderAdapter
from quantsink.models.hub import hub_file

logger = logging.getLogger(__name__)

# open_clip publishes its default pickled HF_WEIGHTS_NAME on the hub with this safetensors twin
SAFETENSORS_WEIGHTS = "open_clip_model.safetensors"


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (no bias_k/bias_v, no zero attention) with q/k/v/out as nn.Linear.

    Called like the module it replaces: `(query, key, value, need_weights=False, attn_mask=None)`
    returns `(output, None)`.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True, dropout: float = 0.0
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, attention: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise ModelLoadError(
                "this open_clip model uses an nn.MultiheadAttention variant (separate k/v dims, bias_k/bias_v or "
                "add_zero_attn) that quantsink cannot split: it is not supported"
            )
        weight = attention.in_proj_weight
        split = cls(
            attention.embed_dim,
            attention.num_heads,
            bias=attention.in_proj_bias is not None,
            batch_first=attention.batch_first,
            dropout=attention.dropout,
        ).to(device=weight.device, dtype=weight.dtype)
        projections = (split.q_proj, split.k_proj, split.v_proj)
        with torch.no_grad():
            for projection, part in zip(projections, weight.chunk(3), strict=True):
                projection.weight.copy_(part)
            if attention.in_proj_bias is not None:
                for projection, part in zip(projections, attention.in_proj_bias.chunk(3), strict=True):
                    projection.bias.copy_(part)
            split.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                split.out_proj.bias.copy_(attention.out_proj.bias)
        return split

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("SplitMultiheadAttention does not return attention weights")
        if not self.batch_first:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention masks True positions, SDPA keeps them
        batch, length, _ = query.shape
        query = self._heads(self.q_proj(query))
        dropout = self.dropout if self.training else 0.0

        def own_attention(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout)

        keys, values = self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        output = attend(self, query, keys, values, attn_mask, query.shape[-1] ** -0.5, own_attention)
        output = self.out_proj(output.transpose(1, 2).reshape(batch, length, self.embed_dim))
        return (output if self.batch_first else output.transpose(0, 1)), None

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, length, _ = projected.shape
        return projected.view(batch, length, self.num_heads, -1).transpose(1, 2)


def split_attention(module: nn.Module) -> nn.Module:
    """Replace, in place and in module order, every nn.MultiheadAttention by a SplitMultiheadAttention."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.MultiheadAttention):
            module.set_submodule(name, SplitMultiheadAttention.from_torch(child))
    return module


@register_adapter
class OpenCLIPAdapter(EditableEncoderAdapter):
    """Config: {"embed_dim", "vision_cfg" (open_clip CLIPVisionCfg fields), "quick_gelu", "preprocess_cfg"}."""

    family = "open-clip"
    modality = "image"

    def __init__(self, model: nn.Module, source: ModelSource):
        super().__init__(model, source)
        self.transform = image_transform_v2(PreprocessCfg(**source.config["preprocess_cfg"]), is_train=False)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        tower = _tower_of(model)
        return (
            isinstance(tower, VisionTransformer)
            and tower.attn_pool is None
            and all(isinstance(block, ResidualAttentionBlock) for block in tower.transformer.resblocks)
        )

    @classmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>") -> "OpenCLIPAdapter":
        """Wrap an open_clip CLIP model or its `.visual` tower; its attentions are split in place."""
        if not cls.handles(model):
            raise ModelLoadError(
                f"{type(model).__name__} is not an open_clip ViT image tower with standard blocks: "
                "timm-backbone, attentional-pool and custom-block towers are not supported"
            )
        tower = split_attention(_tower_of(model))
        config = _describe(tower)
        _check_rebuildable(tower, config)
        return cls(tower, ModelSource(cls.family, spec, config))

    @classmethod
    def from_config(cls, config: dict[str, Any], assets_dir: Path | None = None) -> "OpenCLIPAdapter":
        tower = _build(config)
        config = {**config, "preprocess_cfg": config.get("preprocess_cfg") or _default_preprocess(tower)}
        return cls(split_attention(tower), ModelSource(cls.family, "<config>", config))

    @classmethod
    def from_pretrained(cls, arch: str, tag: str, spec: str) -> "OpenCLIPAdapter":
        """Load the image tower of open_clip's `arch` with the `tag` weights from the hub cache."""
        model_config = open_clip.get_model_config(arch)
        if model_config is None:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ModelLoadError(f"open_clip has no architecture {arch!r}: {hint}see open_clip.list_models()")
        pretrained = open_clip.get_pretrained_cfg(arch, tag)
        if not pretrained:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ModelLoadError(f"open_clip has no weights {tag!r} for {arch}: known tags are {known}")
        config = {
            "embed_dim": model_config["embed_dim"],
            "vision_cfg": model_config["vision_cfg"],
            "quick_gelu": bool(model_config.get("quick_gelu") or pretrained.get("quick_gelu")),
        }
        with torch.device("meta"):  # the architecture alone, to refuse unsupported towers before fetching weights
            if not cls.handles(_build(config)):
                raise ModelLoadError(f"open_clip {arch} is not a ViT with standard blocks: it is not supported")
        checkpoint = _checkpoint(spec, pretrained)
        tower = _build(config)
        _load_visual_weights(tower, checkpoint, spec)
        preprocess = merge_preprocess_dict(PreprocessCfg(), pretrained)
        preprocess["size"] = list(tower.image_size)
        logger.info("loaded %s", spec)
        return cls(split_attention(tower), ModelSource(cls.family, spec, {**config, "preprocess_cfg": preprocess}))

    # --- structure ----------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def attention(self, block_index: int) -> SplitMultiheadAttention:
        return self.model.transformer.resblocks[block_index].attn

    def fc1(self, block_index: int) -> nn.Linear:
        return self.model.transformer.resblocks[block_index].mlp.c_fc

    def fc2(self, block_index: int) -> nn.Linear:
        return self.model.transformer.resblocks[block_index].mlp.c_proj

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the class token, present whatever the pooling

    def patch_embedding(self) -> nn.Module:
        return self.model.conv1

    def _editable_attention(self, block_index: int) -> SplitMultiheadAttention:
        if not self.model.transformer.batch_first:
            raise UserError("quantsink edits the attention of batch-first open_clip towers only")
        return self.attention(block_index)

    # --- data ---------------------------------------------------------------------------
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(image) for image in samples])}

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model(inputs["pixel_values"])
        return output[0] if isinstance(output, tuple) else output  # (pooled, tokens) when output_tokens


def _tower_of(model: nn.Module) -> nn.Module:
    return model.visual if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)) else model


def _build(config: dict[str, Any]) -> nn.Module:
    return _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=config.get("quick_gelu", False))


def _default_preprocess(tower: VisionTransformer) -> dict[str, Any]:
    return {**asdict(PreprocessCfg()), "size": list(tower.image_size)}


def _describe(tower: VisionTransformer) -> dict[str, Any]:
    """The config that rebuilds `tower`'s architecture; initial values it does not record
    (layer-scale init, positional-embedding init) are overwritten by loaded weights anyway."""
    block = tower.transformer.resblocks[0]
    width = tower.conv1.out_channels
    activation = block.mlp.gelu
    if not isinstance(activation, (QuickGELU, nn.GELU)) or getattr(activation, "approximate", "none") != "none":
        raise ModelLoadError(
            f"this open_clip tower uses activation {activation!r}: only GELU and QuickGELU are supported"
        )
    vision_cfg = asdict(CLIPVisionCfg(
        layers=len(tower.transformer.resblocks),
        width=width,
        head_width=width // block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        patch_size=tower.patch_size[0],
        image_size=list(tower.image_size),
        ls_init_value=1.0 if isinstance(block.ls_1, LayerScale) else None,
        no_ln_pre=isinstance(tower.ln_pre, nn.Identity),
        final_ln_after_pool=tower.final_ln_after_pool,
        pool_type=tower.pool_type,
        output_tokens=tower.output_tokens,
        norm_kwargs={"eps": block.ln_1.eps},
    ))
    preprocess = getattr(tower, "preprocess_cfg", None) or _default_preprocess(tower)
    return {
        "embed_dim": tower.output_dim,
        "vision_cfg": vision_cfg,
        "quick_gelu": isinstance(activation, QuickGELU),
        "preprocess_cfg": merge_preprocess_dict(PreprocessCfg(), preprocess),
    }


def _check_rebuildable(tower: nn.Module, config: dict[str, Any]) -> None:
    with torch.device("meta"):
        probe = split_attention(_build(config))
    if _shapes(probe) != _shapes(tower):
        raise ModelLoadError(
            "quantsink cannot describe this open_clip tower well enough to rebuild it from a saved folder: "
            "load it with open_clip:ARCH/PRETRAINED instead"
        )


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _checkpoint(spec: str, pretrained: dict[str, Any]) -> Path:
    location = pretrained.get("hf_hub", "")
    if not location:
        raise ModelLoadError(
            f"{spec} is published only at {pretrained.get('url')}, as a pickle: quantsink reads open_clip weights "
            "from safetensors on the Hugging Face hub; pick a tag that has hf_hub weights"
        )
    repo_id, published = os.path.split(location)  # open_clip's own convention: "org/repo/" or "org/repo/file"
    if published in ("", HF_WEIGHTS_NAME):
        filename = SAFETENSORS_WEIGHTS
    else:
        filename = str(Path(published).with_suffix(".safetensors"))
    return hub_file(spec, repo_id, filename)


def _load_visual_weights(tower: nn.Module, checkpoint: Path, spec: str) -> None:
    try:
        state = load_file(str(checkpoint))
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{checkpoint} is not a readable safetensors file ({error}): re-download {spec}") from None
    visual = {name.removeprefix("visual."): tensor for name, tensor in state.items() if name.startswith("visual.")}
    try:
        tower.load_state_dict(visual, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(
            f"the weights of {spec} do not fit its architecture ({str(error).splitlines()[0]}): "
            "the cached file is not an open_clip checkpoint of this model"
        ) from None
