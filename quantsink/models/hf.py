"""Adapters for Hugging Face transformers encoders: CLIP, SigLIP, SigLIP 2 and DINOv2 image towers,
and BERT sentence encoders.

`HFAdapter` holds what they share: loading from a local folder (config.json + safetensors),
rebuilding from `config.to_dict()`, the image processor or tokenizer saved beside the weights;
`HFImageAdapter` adds the sequence edits of the image towers (quantsink.models.editable).
Each family only says which `model_type`s and classes it takes, where its parts sit inside a
layer, and which output is its embedding.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AttentionInterface,
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BertModel,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    Siglip2ImageProcessor,
    Siglip2VisionModel,
    SiglipImageProcessor,
    SiglipVisionModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quantsink.errors import CheckpointError, ModelLoadError, UserError
from quantsink.io import MANIFEST
from quantsink.models import ON_CPU, Placement
from quantsink.models.attention import attend
from quantsink.models.base import Adapter, ModelSource, register_adapter
from quantsink.models.capabilities import SmoothingGroup
from quantsink.models.deletion import TokenDeletion, take_tokens
from quantsink.models.editable import EditableEncoderAdapter

logger = logging.getLogger(__name__)

# Attention edits (quantsink.models.attention.attend) go in through transformers' attention-function
# registry: "quantsink_sdpa" and "quantsink_eager" run the kernel they are named after, with that
# kernel's mask format, through `attend`.
EDITED_KERNEL = "quantsink_"
EDITABLE_KERNELS = ("eager", "sdpa")


def _edited_attention(kernel: str):
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        if kernel == "eager":  # each modeling file has its own eager function, not in the registry
            run = sys.modules[type(module).__module__].eager_attention_forward
        else:
            run = ALL_ATTENTION_FUNCTIONS[kernel]
        # eager's attention weights, when asked for, cover the sequence's own keys, not a prefix
        weights = None

        def own_attention(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            nonlocal weights
            output, weights = run(module, query, key, value, mask, **kwargs)
            return output.transpose(1, 2)  # transformers' kernels give (batch, queries, heads, head_dim)

        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else scale  # sdpa's default
        output = attend(module, query, key, value, attention_mask, scale, own_attention)
        return output.transpose(1, 2), weights

    return attention


@functools.cache
def _register_edited_kernels() -> None:
    """Add quantsink's kernels to transformers' registries, once, when a model first needs them:
    importing quantsink writes nothing into a third-party global."""
    for kernel in EDITABLE_KERNELS:
        AttentionInterface.register(EDITED_KERNEL + kernel, _edited_attention(kernel))
        AttentionMaskInterface.register(EDITED_KERNEL + kernel, ALL_MASK_ATTENTION_FUNCTIONS[kernel])


class HFAdapter(Adapter):
    """A transformers encoder whose layers are `encoder.<layers_attr>[i]`."""

    modality = "image"
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type`s this family loads
    model_classes: ClassVar[tuple[type[PreTrainedModel], ...]]  # the first that fits a config is the default
    layers_attr: ClassVar[str] = "layers"
    attention_path: ClassVar[str] = "self_attn"
    fc1_path: ClassVar[str] = "mlp.fc1"
    fc2_path: ClassVar[str] = "mlp.fc2"
    leading_tokens: ClassVar[int] = 1
    mask_input: ClassVar[str | None] = None  # the input that marks real tokens, when some are padding
    build_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, source: ModelSource, processor: Any):
        super().__init__(model, source)
        self.processor = processor
        self._check_layout()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    @classmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>", processor: Any = None) -> "HFAdapter":
        """Wrap a loaded model; `processor` (image processor or tokenizer) defaults to what the
        family's config implies."""
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        # kernels differ in rounding: a rebuilt model must run the one this model runs
        config["attn_implementation"] = model.config._attn_implementation.removeprefix(EDITED_KERNEL)
        if processor is None:
            processor = cls.default_processor(model.config)
        return cls(model, ModelSource(cls.family, spec, config), processor)

    @classmethod
    def from_config(cls, config: dict[str, Any], assets_dir: Path | None = None) -> "HFAdapter":
        model_type = config.get("model_type")
        if model_type not in cls.model_types:
            raise CheckpointError(
                f"a {cls.family} model cannot be rebuilt from a config of model_type {model_type!r}: "
                f"the folder's {MANIFEST} is inconsistent, re-export it"
            )
        hf_config = CONFIG_MAPPING[model_type].from_dict(config)
        model = cls.model_class(hf_config)(hf_config, **cls.build_kwargs)
        processor = cls.load_processor(assets_dir) if assets_dir is not None else None
        return cls.from_module(model, "<config>", processor)

    @classmethod
    def from_pretrained(cls, folder: Path, spec: str, placement: Placement = ON_CPU) -> "HFAdapter":
        """Load a Hugging Face model folder (config.json + safetensors weights), its weights read
        straight onto `placement`'s device, or spread over the devices by accelerate."""
        model_class, model_config = cls.architecture(AutoConfig.from_pretrained(folder))
        placed: dict[str, Any] = {}
        if placement.device_map == "auto":
            placed["device_map"] = dispatch_map(model_class, model_config, placement.max_memory, spec, **cls.build_kwargs)
        elif placement.device != "cpu":  # on the CPU as transformers loads by default: nothing moves
            placed["device_map"] = placement.device
        model = _load_weights(model_class, folder, model_config, **placed, **cls.build_kwargs)
        logger.info("loaded %s from %s as %s", spec, folder, model_class.__name__)
        return cls.from_module(model, spec, cls.load_processor(folder))

    @classmethod
    def architecture(cls, config: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
        """The class and config to load from a folder's config; two-tower checkpoints give their image tower."""
        tower = getattr(config, "vision_config", None)
        config = tower if tower is not None else config
        return cls.model_class(config), config

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        fitting = [candidate for candidate in cls.model_classes if isinstance(config, candidate.config_class)]
        if not fitting:
            raise ModelLoadError(f"{type(config).__name__} is not a config of the {cls.family} family")
        named = [candidate for candidate in fitting if candidate.__name__ in (config.architectures or ())]
        return (named or fitting)[0]

    # --- preprocessing assets -----------------------------------------------------------
    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        """The preprocessing a model of this config was trained with, when no files say otherwise."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, folder: Path) -> Any:
        if (Path(folder) / "preprocessor_config.json").is_file():
            return AutoImageProcessor.from_pretrained(folder)
        return None

    def save_assets(self, folder: Path) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(folder)

    # --- a folder transformers loads (capabilities.TransformersCheckpoint) ----------------
    def save_transformers_config(self, folder: Path) -> None:
        """config.json as `from_pretrained` reads it, naming the model's own class (a loaded
        config may name another architecture of the family)."""
        config = copy.deepcopy(self.model.config)
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(folder)

    def tied_output_projection(self) -> str | None:
        """The name of the output projection when it shares the input embeddings' weight."""
        projection = self.model.get_output_embeddings() if getattr(self.model.config, "tie_word_embeddings", False) else None
        return next((name for name, module in self.model.named_modules() if module is projection), None)

    # --- structure ----------------------------------------------------------------------
    def _tower(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)  # *WithProjection classes wrap the tower

    def _layers(self) -> nn.ModuleList:
        return getattr(self._tower().encoder, self.layers_attr)

    def blocks(self) -> list[nn.Module]:
        return list(self._layers())

    def attention(self, block_index: int) -> nn.Module:
        return self._layers()[block_index].get_submodule(self.attention_path)

    def fc1(self, block_index: int) -> nn.Linear:
        return self._layers()[block_index].get_submodule(self.fc1_path)

    def fc2(self, block_index: int) -> nn.Linear:
        return self._layers()[block_index].get_submodule(self.fc2_path)

    @property
    def num_prefix_tokens(self) -> int:
        return self.leading_tokens

    def _check_layout(self) -> None:
        """Fail at load time, not mid-calibration, on a variant whose layers look different."""
        try:
            projections = (self.fc1(0), self.fc2(0))
            self.attention(0)
        except (AttributeError, IndexError) as error:
            raise self._unsupported_layout(str(error)) from None
        if not all(isinstance(projection, nn.Linear) for projection in projections):
            raise self._unsupported_layout("its MLP projections are not nn.Linear")

    def _unsupported_layout(self, reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"{type(self.model).__name__} does not have the layer layout the {self.family} adapter expects "
            f"({reason}): this variant is not supported"
        )

    # --- data ---------------------------------------------------------------------------
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        # not every image processor converts grayscale or RGBA (SigLIP 2's does not)
        return dict(self.processor(images=[image.convert("RGB") for image in samples], return_tensors="pt"))

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs).pooler_output

    def token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return inputs[self.mask_input].bool() if self.mask_input else None


class HFImageAdapter(HFAdapter, EditableEncoderAdapter):
    """A transformers image encoder, whose sequence quantsink can edit through transformers'
    attention-function registry."""

    patch_embedding_path: ClassVar[str] = "embeddings.patch_embedding"
    # inside a (pre-LN) layer: the norms before attention and before the MLP; inside its
    # attention: the query, key, value and output projections (`smoothing_groups`)
    norm_paths: ClassVar[tuple[str, str]] = ("layer_norm1", "layer_norm2")
    projection_names: ClassVar[tuple[str, str, str, str]] = ("q_proj", "k_proj", "v_proj", "out_proj")

    # --- smoothing (capabilities.Smoothable) ---------------------------------------------
    def smoothing_groups(self) -> list[SmoothingGroup]:
        """Pre-LN layers: each norm feeds only the Linears after it (the residual is taken
        before it), and attention mixes v_proj's output channels one by one into the output
        projection, so every 1/s folds. fc2's input, the activation's output, has neither a
        weight to fold into nor a module of its own to multiply at: it is not smoothed."""
        groups = []
        for block in self.block_names():
            query, key, value, output = (f"{block}.{self.attention_path}.{name}" for name in self.projection_names)
            groups += [
                SmoothingGroup((query, key, value), fold_into=f"{block}.{self.norm_paths[0]}"),
                SmoothingGroup((output,), fold_into=value),
                SmoothingGroup((f"{block}.{self.fc1_path}",), fold_into=f"{block}.{self.norm_paths[1]}"),
            ]
        return groups

    # --- sequence edits ------------------------------------------------------------------
    def _editable_attention(self, block_index: int) -> nn.Module:
        kernel = self.model.config._attn_implementation
        if not kernel.startswith(EDITED_KERNEL):
            if kernel not in EDITABLE_KERNELS:
                raise UserError(
                    f"{self.source.spec} runs attention with {kernel!r}: quantsink edits attention only under "
                    f"{' or '.join(EDITABLE_KERNELS)}; load the model with attn_implementation='sdpa'"
                )
            _register_edited_kernels()
            self.model.set_attn_implementation(EDITED_KERNEL + kernel)
        return self.attention(block_index)

    def patch_embedding(self) -> nn.Module:
        return self._tower().get_submodule(self.patch_embedding_path)

    def call_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return args[1] if len(args) > 1 else kwargs.get("attention_mask")

    def with_call(
        self, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        if len(args) > 1:
            return (hidden, mask, *args[2:]), kwargs
        if "attention_mask" in kwargs:
            kwargs = {**kwargs, "attention_mask": mask}
        return (hidden, *args[1:]), kwargs


@register_adapter
class HFCLIPAdapter(HFImageAdapter):
    family = "hf-clip"
    model_types = ("clip", "clip_vision_model")
    model_classes = (CLIPVisionModel, CLIPVisionModelWithProjection)

    @classmethod
    def architecture(cls, config: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
        if config.model_type == "clip":
            # a full CLIP checkpoint: its image embedding is the projected one
            tower = config.vision_config
            tower.projection_dim = config.projection_dim
            return CLIPVisionModelWithProjection, tower
        return super().architecture(config)

    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        size = config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = self.model(**inputs)
        if isinstance(self.model, CLIPVisionModelWithProjection):
            return outputs.image_embeds
        return outputs.pooler_output


@register_adapter
class HFSiglipAdapter(HFImageAdapter):
    family = "hf-siglip"
    model_types = ("siglip", "siglip_vision_model")
    model_classes = (SiglipVisionModel,)
    leading_tokens = 0  # SigLIP pools with an attention head, it has no CLS token

    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        return SiglipImageProcessor(size={"height": config.image_size, "width": config.image_size})


@register_adapter
class HFSiglip2Adapter(HFImageAdapter):
    """SigLIP 2 NaFlex: images become a padded sequence of at most `num_patches` patches."""

    family = "hf-siglip2"
    model_types = ("siglip2", "siglip2_vision_model")
    model_classes = (Siglip2VisionModel,)
    leading_tokens = 0
    mask_input = "pixel_attention_mask"

    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)

    def follow_deletion(self, deletion: TokenDeletion) -> list[torch.utils.hooks.RemovableHandle]:
        """The pooling head takes the pixel attention mask of the full sequence."""

        def pool_kept(_module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            hidden, mask = args[0], args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is None or mask.shape[-1] == hidden.shape[1]:
                return None
            return (hidden, take_tokens(mask, deletion.kept, 1), *args[2:]), {}

        return [self.model.head.register_forward_pre_hook(pool_kept, with_kwargs=True)] if self.model.use_head else []

    def watch_patch_grids(self, record: Callable[[list[tuple[int, int]]], None]) -> list[torch.utils.hooks.RemovableHandle]:
        """A NaFlex patch grid is each image's own `spatial_shapes`, its padding after it."""

        def note(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            shapes = args[1] if len(args) > 1 else kwargs["spatial_shapes"]
            record([tuple(shape) for shape in shapes.tolist()])

        return [self._tower().embeddings.register_forward_pre_hook(note, with_kwargs=True)]


@register_adapter
class HFDinov2Adapter(HFImageAdapter):
    family = "hf-dinov2"
    register_prefix_blocks = "sensitive_only"  # RegCache prefixes DINOv2 only at l_q (the paper's setting)
    model_types = ("dinov2", "dinov2_with_registers")
    model_classes = (Dinov2Model, Dinov2WithRegistersModel)
    layers_attr = "layer"
    attention_path = "attention"
    patch_embedding_path = "embeddings.patch_embeddings.projection"
    norm_paths = ("norm1", "norm2")
    projection_names = ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        # DINOv2's evaluation transform: resize to 256/224 of the crop, centre crop, ImageNet statistics
        crop = config.image_size
        return BitImageProcessor(
            size={"shortest_edge": round(crop * 256 / 224)},
            crop_size={"height": crop, "width": crop},
            resample=PILImageResampling.BICUBIC,
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        )

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + getattr(self.model.config, "num_register_tokens", 0)


class HFTextAdapter(HFAdapter):
    """A transformers text model: its processor is the tokenizer saved in the model's folder
    (vocabulary files, which no config implies), and padding is marked by `attention_mask`."""

    modality = "text"
    mask_input = "attention_mask"
    tokenizer_files: ClassVar[tuple[str, ...]]  # any of them in a folder means it has a tokenizer

    @classmethod
    def default_processor(cls, config: PretrainedConfig) -> Any:
        return None

    @classmethod
    def load_processor(cls, folder: Path) -> Any:
        folder = Path(folder)
        if not any((folder / name).is_file() for name in cls.tokenizer_files):
            return None
        return AutoTokenizer.from_pretrained(folder)

    @property
    def tokenizer(self) -> Any:
        if self.processor is None:
            raise UserError(
                f"{self.source.spec} has no tokenizer: load the model from its folder (with its tokenizer files) "
                "or pass processor=AutoTokenizer.from_pretrained(...) to from_module"
            )
        return self.processor

    def token_texts(self, inputs: dict[str, torch.Tensor]) -> list[list[str]]:
        """Each input's tokens as the tokenizer writes them (what reports name outlier tokens by)."""
        return [self.tokenizer.convert_ids_to_tokens(ids) for ids in inputs["input_ids"].tolist()]

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """Two tokens, by id: a probe needs no tokenizer."""
        input_ids = torch.tensor([[0, 1]], device=self.input_device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@register_adapter
class HFBertTextAdapter(HFTextAdapter):
    """A BERT sentence encoder: the embedding is the masked mean of the last hidden states,
    L2-normalised, as sentence-transformers computes it for all-MiniLM-L6-v2."""

    family = "hf-bert-text"
    model_types = ("bert",)
    model_classes = (BertModel,)
    layers_attr = "layer"
    attention_path = "attention.self"
    fc1_path = "intermediate.dense"
    fc2_path = "output.dense"
    tokenizer_files = ("tokenizer.json", "vocab.txt")
    # the pooler feeds no sentence embedding: without it quantizers and folders skip dead weights
    build_kwargs = {"add_pooling_layer": False}

    @classmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>", processor: Any = None) -> "HFAdapter":
        """Wrap a BertModel, dropping its unused pooler in place."""
        model.pooler = None
        return super().from_module(model, spec, processor)

    @classmethod
    def load_processor(cls, folder: Path) -> Any:
        tokenizer = super().load_processor(folder)
        sentence_config = Path(folder) / "sentence_bert_config.json"
        if tokenizer is not None and sentence_config.is_file():
            # sentence-transformers truncates at its own max_seq_length, shorter than the tokenizer's
            tokenizer.model_max_length = json.loads(sentence_config.read_text())["max_seq_length"]
        return tokenizer

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """Post-LN layers (capabilities.Smoothable): each LayerNorm's output also feeds the
        residual, so the 1/s of the query/key/value and intermediate inputs cannot fold into it;
        it is multiplied into the input of attention.self and of intermediate, which hand it to
        those Linears alone. output.dense's input comes out of GELU, which no scale passes
        through: it is multiplied at output's first input (its second, the residual, untouched),
        in place, since GELU's output reaches nothing else. Only value -> attention.output.dense
        folds: attention mixes value's channels one by one."""
        groups = []
        for block in self.block_names():
            attention = f"{block}.{self.attention_path}"
            groups += [
                SmoothingGroup(tuple(f"{attention}.{name}" for name in ("query", "key", "value")), multiply_input_of=attention),
                SmoothingGroup((f"{block}.attention.output.dense",), fold_into=f"{attention}.value"),
                SmoothingGroup((f"{block}.{self.fc1_path}",), multiply_input_of=f"{block}.intermediate"),
                SmoothingGroup((f"{block}.{self.fc2_path}",), multiply_input_of=f"{block}.output", overwrite_input=True),
            ]
        return groups

    def delete_tokens_at(self, block_index: int, count: int, refill: str = "none") -> TokenDeletion:
        """Refused: a sentence encoder offers no sequence edits, and its pooling could not follow a deletion."""
        raise UserError(
            "tokens cannot be deleted from a sentence encoder: its embedding averages the last hidden states "
            "over the input's attention mask, outside the model"
        )

    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(samples), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def checkpoint_names(model: PreTrainedModel, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """Model tensor name -> key in a transformers checkpoint holding `keys`, through the renamings
    transformers applies to this model's checkpoints when it loads them (DINOv2's
    attention.attention.query is attention.q_proj); and the keys that only a converter (a merge, a
    split) turns into model tensors, which a reader of stored tensors cannot use."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [conversion for conversion in conversions if isinstance(conversion, WeightRenaming)]
    converters = [conversion for conversion in conversions if not isinstance(conversion, WeightRenaming)]
    expected = model.state_dict()
    names, converted = {}, []
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if converter is not None:
            converted.append(key)
        else:
            names[name] = key
    return names, converted


def dispatch_map(model_class: type[PreTrainedModel], config: PretrainedConfig, max_memory: dict[str, int | str] | None,
                 spec: str, **build_kwargs: Any) -> dict[str, Any]:
    """Where accelerate places each module of the model (`device_map="auto"` within
    `max_memory`), worked out on the empty architecture before any weight is read, as
    transformers works it out: its blocks whole, the GPUs first. A module offloaded to the CPU
    beside a GPU, or to disk, is refused: accelerate keeps its weights there and copies them in
    for each call, so what quantization writes into the module would be lost."""
    from accelerate import init_empty_weights, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    with init_empty_weights():
        empty = model_class(config, **build_kwargs)
    memory = None if max_memory is None else {int(key) if key.isdigit() else key: size for key, size in max_memory.items()}
    unsplit = list(empty._no_split_modules or [])
    balanced = get_balanced_memory(empty, max_memory=memory, no_split_module_classes=unsplit, dtype=torch.float32)
    device_map = infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=unsplit, dtype=torch.float32)
    computing = set(device_map.values()) - {"cpu", "disk"}
    offloaded = [(name, where) for name, where in device_map.items() if where == "disk" or (where == "cpu" and computing)]
    if offloaded:
        name, where = offloaded[0]
        within = f"within max_memory {max_memory}" if max_memory is not None else "in this machine's memory"
        raise UserError(
            f"execution.device_map auto: {spec} does not fit {within}, and accelerate would offload {len(offloaded)} of "
            f"its modules (e.g. {name or 'the model'}) to {where}, copying their weights in for each call, which loses what "
            "quantization writes into them: raise max_memory, or use pipeline: sequential with offload_dir "
            "(quantsink streams the blocks from disk itself)"
        )
    return device_map


def _load_weights(
    model_class: type[PreTrainedModel], folder: Path, config: PretrainedConfig, **kwargs: Any
) -> PreTrainedModel:
    try:
        with _quiet_load_report():
            model, info = model_class.from_pretrained(
                folder, config=config, use_safetensors=True, dtype=torch.float32, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"cannot load {model_class.__name__} weights from {folder} ({str(error).strip().splitlines()[0]}): "
            "the folder needs safetensors weights that match its config.json"
        ) from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"{folder} lacks {len(missing)} weights of {model_class.__name__} (e.g. {missing[0]}): "
            "it is not a complete checkpoint of this model"
        )
    return model


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Loading the image tower of a two-tower checkpoint reports every text weight as unexpected;
    the keys that matter, the missing ones, are checked by the caller instead. A filter, not a
    level: transformers runs extra checks, with their own warnings, when that logger's level is raised."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_warnings)
    try:
        yield
    finally:
        report_logger.removeFilter(_drop_warnings)


def _drop_warnings(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
