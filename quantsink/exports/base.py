"""What every export format shares: the artifact the pipeline hands it, and what a format can
write, declared as data (as compressed-tensors' `can_compress` does) and checked against the
recipe before any calibration is spent on it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from quantsink import io
from quantsink.models.base import Adapter
from quantsink.quantizers.base import QuantizedLinear, Quantizer
from quantsink.recipe import QuantizationConfig, Recipe
from quantsink.registry import QUANTIZERS

if TYPE_CHECKING:
    from quantsink.methods.base import Method


@dataclass(frozen=True)
class Artifact:
    """A quantized model as the pipeline leaves it: what every format reads. `quantizer` is
    None when the recipe quantizes only the KV cache."""

    adapter: Adapter
    recipe: Recipe
    quantizer: Optional[Quantizer]
    methods: tuple["Method", ...]
    report: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def quantized_linears(self) -> dict[str, QuantizedLinear]:
        return self.quantizer.quantized_linears(self.model)


@dataclass(frozen=True)
class Writes:
    """What a format can write.

    `integer_layers`: it re-packs each quantized Linear's integers and scales, so the backend
    must offer them (`Quantizer.integer_layers`); `weights`: it needs quantized weights;
    `loads_into`: the backend whose layers the saved tensors rebuild (None: the one that
    quantized), which must be able to run the recipe."""

    integer_layers: bool = False
    weights: bool = False
    loads_into: Optional[str] = None


class ExportFormat:
    """How a quantized model's tensors are laid out in a folder.

    `write` saves them and returns what it changes in quantsink.json's `quantization` section
    (e.g. the backend that runs the saved tensors); `read` turns the saved tensors back into the
    state of the model that backend's `restore` rebuilt. The default is the model's own state."""

    writes = Writes()

    def __init__(self, name: str):
        self.name = name

    def incompatibility(self, config: QuantizationConfig) -> Optional[str]:
        """Why this format cannot hold a model quantized as `config` (one line, with its fix), or None."""
        if self.writes.integer_layers and not QUANTIZERS.get(config.backend).integer_layers:
            return (f"quantization.backend is {config.backend}, whose layers hold no integers export.format "
                    f"{self.name} can re-pack: use export.format fake-quant")
        if self.writes.weights and config.weights is None:
            return f"quantization.weights is null, export.format {self.name} needs quantized weights: use fake-quant"
        if self.writes.loads_into is not None:
            problem = QUANTIZERS.get(self.writes.loads_into).incompatibility(config)
            if problem is not None:
                return f"{problem}: use export.format fake-quant"
        return self.scheme_incompatibility(config)

    def scheme_incompatibility(self, config: QuantizationConfig) -> Optional[str]:
        """What the format's own layout cannot hold beyond `writes`, or None."""
        return None

    def write(self, artifact: Artifact, folder: Path) -> dict[str, Any]:
        io.save_tensors(artifact.model.state_dict(), folder / io.WEIGHTS)
        return {}

    def read(self, folder: Path, quantizer: Optional[Quantizer], model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        return io.load_tensors(folder / io.WEIGHTS)


def replace_layers(state: dict[str, torch.Tensor], layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`state` with each named layer's entries replaced by the given ones (a Linear has no
    submodules, so the name's prefix holds exactly its own entries)."""
    prefixes = tuple(f"{name}." for name in layers)
    kept = {key: value for key, value in state.items() if not key.startswith(prefixes)}
    kept.update({f"{name}.{key}": value for name, tensors in layers.items() for key, value in tensors.items()})
    return kept
