"""The Adapter: the only code that knows a model family.

Everything else in quantsink (calibration, methods, quantizers, export) sees a model through
this view: its transformer blocks, each block's attention and MLP projections, how many special
tokens lead the sequence, how raw samples become model inputs, and which output is the
embedding that fidelity is measured on.

What some families offer beyond it (sequence edits of an image encoder, a KV cache) are the
capability Protocols of quantsink.models.capabilities.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from quantsink.registry import Registry


@dataclass
class ModelSource:
    """Where a model came from and how to rebuild its architecture without downloading.

    `spec` is what the user typed (short name, hf:..., open_clip:..., timm:..., folder);
    `config` is a JSON-serialisable description that `Adapter.from_config` turns back into the
    same architecture with random weights, so a saved folder can be reloaded offline.
    """

    family: str
    spec: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "spec": self.spec, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSource":
        return cls(family=data["family"], spec=data["spec"], config=dict(data.get("config", {})))


class Adapter(ABC):
    family: ClassVar[str]
    modality: ClassVar[str]  # "image" or "text": which calibration samples it takes

    def __init__(self, model: nn.Module, source: ModelSource):
        self.model = model.eval()
        self.source = source

    # --- construction -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether an in-memory module belongs to this family."""

    @classmethod
    @abstractmethod
    def from_module(cls, model: nn.Module, spec: str = "<module>") -> "Adapter":
        """Wrap a module the user built or loaded themselves."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any], assets_dir: Path | None = None) -> "Adapter":
        """Rebuild the architecture (random weights) from `ModelSource.config`; `assets_dir` is a
        folder `save_assets` wrote (tokenizer, image-processor files), when there is one."""

    def save_assets(self, folder: Path) -> None:
        """Write beside the weights what preprocessing needs and the config cannot carry
        (tokenizer files, image-processor config), so `from_config` can rebuild offline."""

    # --- structure ----------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in order; their outputs are the residual stream."""

    @abstractmethod
    def attention(self, block_index: int) -> nn.Module:
        """The self-attention module of a block."""

    @abstractmethod
    def fc1(self, block_index: int) -> nn.Linear:
        """The MLP's first projection of a block."""

    @abstractmethod
    def fc2(self, block_index: int) -> nn.Linear:
        """The MLP's output projection of a block (where massive activations enter)."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Special tokens (CLS, registers) leading every sequence; never deleted or pruned."""

    # --- data ---------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Raw samples (PIL images or strings) -> a batch of model inputs, with the
        preprocessing the model was trained with; text is cut at `max_length` tokens when given
        (images ignore it)."""

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the model and return the (batch, dim) embedding fidelity is measured on."""

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """The smallest input of the model, for the probe forwards that prove what quantsink
        installed runs (quantsink.models.probe): one tiny image, preprocessed as any other."""
        return on_device(self.preprocess([Image.new("RGB", (32, 32), (124, 116, 104))]), self.input_device)

    def token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(batch, tokens) bool mask of real tokens in block outputs, or None when all are real;
        with tokens deleted, `block_output_tokens` gives it for a block's output."""
        return None

    def block_output_tokens(self, block_index: int, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` (batch, tokens, ...), one entry per token of the full sequence (e.g. the
        `token_mask`), for the tokens of block `block_index`'s output in the last forward: the
        ones the token deletions in force kept there (quantsink.models.editable)."""
        return per_token

    # --- helpers shared by every family -------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        """Where the model takes its inputs: where its blocks compute when they come in one at a
        time (quantsink.models.streaming), else where its first weight is (the embeddings; with
        accelerate's device_map its hooks move inputs on from there)."""
        from quantsink.models.streaming import STREAMED_ATTRIBUTE

        residence = self.__dict__.get(STREAMED_ATTRIBUTE)
        if residence is not None:
            return residence.device
        return next((weight.device for weight in self.model.parameters() if not weight.is_meta), torch.device("cpu"))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def block_names(self) -> list[str]:
        names = {id(module): name for name, module in self.model.named_modules()}
        return [names[id(block)] for block in self.blocks()]


ADAPTERS: Registry[type[Adapter]] = Registry("model family")


def register_adapter(adapter: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an Adapter under its own `family` name."""
    return ADAPTERS.register(adapter.family)(adapter)


def on_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch of model inputs with its tensors on `device` (the same batch when they are there)."""
    if all(value.device == device for value in inputs.values() if isinstance(value, torch.Tensor)):
        return inputs
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def hidden_states_of(block_output: Any) -> torch.Tensor:
    """A block's residual-stream output, whatever tuple or object the family wraps it in."""
    if isinstance(block_output, torch.Tensor):
        return block_output
    if isinstance(block_output, (tuple, list)):
        return block_output[0]
    raise TypeError(f"cannot find hidden states in a block output of type {type(block_output).__name__}")
