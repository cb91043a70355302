"""The `compressed-tensors` export: a Hugging Face folder that transformers loads with
`from_pretrained` (when the compressed-tensors package is installed) and vLLM serves.

What it writes, as llm-compressor does:
- config.json: the model's config plus `quantization_config`: quant_method
  "compressed-tensors", one config group targeting `Linear`, `ignore` naming every Linear left in
  float, `kv_cache_scheme` (null unless a method exports one), format `int-quantized` (8-bit
  weights and inputs) or `naive-quantized` (other widths), quantization_status `compressed`;
- model.safetensors: each quantized Linear as `weight` (the integers, int8), `weight_scale`,
  `weight_zero_point` (asymmetric only), `input_scale` and `input_zero_point` (static inputs;
  the zero point only when asymmetric), `bias`; KV-cache scales as their method names them (one
  pair for each attention compressed-tensors hooks, no other);
  everything else as the model holds it.

quantsink.json, beside it, holds what the format cannot say (recipe, the methods' state and
tensors, the quantizer's state), and `quantsink.load` reads the same folder.

Integers: compressed-tensors' grid is signed, [-2^(b-1), 2^(b-1) - 1]. quantsink's symmetric
integers lie inside it and are stored as they are; asymmetric ones ([0, 2^b - 1]) are shifted
by 2^(b-1), zero points with them, which leaves every dequantized value unchanged. Loaders
compute dynamic input scales themselves (compressed-tensors: absmax / 127.5, quantsink:
absmax / 127), so a dynamic model reloaded by transformers differs from quantsink's by that
rounding; static models agree except that inputs beyond the calibrated range clip at -128.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, UserError
from quantsink.export import ExportFormat
from quantsink.models.base import Adapter
from quantsink.quantizers.fake import FakeQuantLinear, weight_rows
from quantsink.quantizers.functional import dequantize, fake_quantize
from quantsink.quantizers.int8 import Int8Linear, grid_weight
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs
from quantsink.registry import EXPORT_FORMATS

if TYPE_CHECKING:
    from quantsink.api import QuantizationResult

STRATEGIES = {"per_channel": "channel", "per_tensor": "tensor", "per_group": "group", "per_token": "token"}


@runtime_checkable
class CompressedTensorsKVCache(Protocol):
    """The hook for a method whose KV-cache quantization compressed-tensors can state."""

    def compressed_tensors_kv_cache(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The `kv_cache_scheme` (compressed-tensors QuantizationArgs fields, e.g. {num_bits: 8,
        type: int, symmetric: true, strategy: tensor, dynamic: false}) and its tensors, named as
        the Hugging Face model names them (`model.layers.0.self_attn.k_scale`, `.v_scale`)."""


def grid_shift(bits: int, symmetric: bool) -> int:
    """What moves quantsink's integers onto compressed-tensors' signed grid."""
    return 0 if symmetric else 2 ** (bits - 1)


def fake_quantize_signed_grid(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric fake quantization as compressed-tensors computes it when transformers
    loads a checkpoint (`forward_quantize`): round(clamp(x / scale, -2^(b-1), 2^(b-1) - 1)) *
    scale, in x's dtype with the scale cast to it, as a loaded model holds its scales. That grid
    is quantsink's asymmetric one moved down by `grid_shift`, so that shift as the zero point gives
    the same values (clamping before or after rounding agrees on integer bounds)."""
    scale = scale.to(x)
    return fake_quantize(x, scale, torch.full_like(scale, grid_shift(bits, symmetric=False)), bits, symmetric=False)


def weight_scheme(args: WeightArgs) -> dict[str, Any]:
    return {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": STRATEGIES[args.granularity],
            "group_size": args.group_size, "dynamic": False}


def input_scheme(args: ActivationArgs) -> dict[str, Any]:
    return {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": STRATEGIES[args.granularity],
            "dynamic": args.dynamic}


def quantization_config(config: QuantizationConfig, ignore: list[str], kv_cache_scheme: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The `quantization_config` of config.json, validated by compressed-tensors' own schema."""
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    group = {"targets": ["Linear"], "weights": weight_scheme(config.weights)}
    if config.activations is not None:
        group["input_activations"] = input_scheme(config.activations)
    int_quantized = config.weights.bits == 8 and config.activations is not None and config.activations.bits == 8
    return CTConfig.model_validate({
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": kv_cache_scheme,
        "format": "int-quantized" if int_quantized else "naive-quantized",
        "quantization_status": "compressed",
    })


def compressed_layer(module: FakeQuantLinear | Int8Linear) -> dict[str, torch.Tensor]:
    """A quantized Linear's tensors under compressed-tensors' names."""
    if isinstance(module, Int8Linear):
        return module.state_dict()  # symmetric int8: already the int-quantized layout
    weights, inputs = module.weight_args, module.activation_args
    shift = grid_shift(weights.bits, weights.symmetric)
    tensors = {"weight": (grid_weight(module) - shift).to(torch.int8), "weight_scale": module.weight_scale}
    if not weights.symmetric:
        tensors["weight_zero_point"] = (module.weight_zero_point - shift).to(torch.int8)
    if module.quantizes_static_input:
        tensors["input_scale"] = module.input_scale
        if not inputs.symmetric:
            tensors["input_zero_point"] = (module.input_zero_point - grid_shift(inputs.bits, False)).to(torch.int8)
    if module.bias is not None:
        tensors["bias"] = module.bias
    return tensors


def restore_fake_layer(tensors: dict[str, torch.Tensor], name: str, module: FakeQuantLinear, origin: Path) -> None:
    """Turn a layer's compressed-tensors entries in `tensors` back into FakeQuantLinear's state
    (the weight dequantized exactly as `freeze` left it); missing entries are left for the
    loader to report."""
    weights, inputs = module.weight_args, module.activation_args
    weight, scale = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    if weight is not None and scale is not None:
        if weight.dtype != torch.int8 or weight.shape != module.weight.shape or scale.shape != module.weight_scale.shape:
            raise CheckpointError(
                f"{origin}: {name}.weight must be int8 {tuple(module.weight.shape)} with weight_scale "
                f"{tuple(module.weight_scale.shape)}, got {weight.dtype} {tuple(weight.shape)} and "
                f"{tuple(scale.shape)}; re-export it"
            )
        shift = grid_shift(weights.bits, weights.symmetric)
        stored = tensors.pop(f"{name}.weight_zero_point", None)
        zero_point = torch.zeros_like(scale) if stored is None else stored.to(scale.dtype) + shift
        rows = weight_rows(weight.to(scale.dtype) + shift, weights)
        groups = rows.shape[0]
        tensors[f"{name}.weight"] = dequantize(rows, scale.reshape(groups, 1), zero_point.reshape(groups, 1)).reshape(weight.shape)
        tensors[f"{name}.weight_zero_point"] = zero_point
    input_scale = tensors.get(f"{name}.input_scale")
    if module.quantizes_static_input and input_scale is not None:
        stored = tensors.pop(f"{name}.input_zero_point", None)
        shift = grid_shift(inputs.bits, inputs.symmetric)
        tensors[f"{name}.input_zero_point"] = torch.zeros_like(input_scale) if stored is None else stored.to(input_scale.dtype) + shift


def kv_cache_export(result: "QuantizationResult") -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]]:
    """The KV-cache scheme and tensors of the method that exports one, else (None, {})."""
    exporters = [method for method in result.methods if isinstance(method, CompressedTensorsKVCache)]
    if len(exporters) > 1:
        raise UserError(f"methods {[m.name for m in exporters]} each quantize the KV cache: keep one")
    if not exporters:
        return None, {}
    return exporters[0].compressed_tensors_kv_cache(result.adapter)


def check_kv_cache_targets(model: nn.Module, kv_tensors: dict[str, torch.Tensor]) -> None:
    """A kv_cache_scheme applies to every attention that compressed-tensors recognises, and to no
    other: the KV tensors must name exactly those, or a loader would skip some scales and run
    other attentions on uninitialised ones."""
    from compressed_tensors.quantization import is_cached_attention_module

    recognised = {name for name, module in model.named_modules() if is_cached_attention_module(module)}
    named = {key.rpartition(".")[0] for key in kv_tensors}
    if named != recognised:
        unknown = sorted(named - recognised)
        problem = (f"{unknown[0]} is not an attention it recognises (k_proj/v_proj or qkv_proj, called with past_key_values)"
                   if unknown else f"{sorted(recognised - named)[0]} has no KV scales")
        raise UserError(f"compressed-tensors applies a kv_cache_scheme to the attentions it recognises, and {problem}: "
                        "use export.format int8 or fake-quant")


def save_compressed_tensors(
    model: nn.Module,
    config: QuantizationConfig,
    folder: Path,
    kv_cache: tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]] = (None, {}),
) -> None:
    """Write config.json and model.safetensors for a transformers model whose Linears the fake or
    int8 backend quantized as `config`; `kv_cache` is a `kv_cache_scheme` and its tensors."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UserError(f"export.format compressed-tensors needs a transformers model, not a {type(model).__name__}: "
                        "use export.format int8 or fake-quant")
    output_embeddings = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(output_embeddings, (FakeQuantLinear, Int8Linear)):
        raise UserError("the quantized output projection is tied to the input embeddings, which stay in float: "
                        "add it to quantization.ignore (e.g. lm_head)")
    kv_cache_scheme, kv_tensors = kv_cache
    if kv_cache_scheme is not None:
        check_kv_cache_targets(model, kv_tensors)
    tensors = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (FakeQuantLinear, Int8Linear)):
            for key in module.state_dict():
                del tensors[f"{name}.{key}"]
            tensors.update({f"{name}.{key}": value for key, value in compressed_layer(module).items()})
    tensors.update(kv_tensors)
    io.save_tensors(tensors, folder / io.WEIGHTS)

    hf_config = copy.deepcopy(model.config)
    hf_config.architectures = [type(model).__name__]
    hf_config.save_pretrained(folder)
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    quantization = quantization_config(config, ignore, kv_cache_scheme)
    ModelCompressor(quantization_config=quantization).update_config(str(folder))


class CompressedTensorsExport(ExportFormat):
    def check(self, config: QuantizationConfig) -> Optional[str]:
        if config.backend not in ("fake", "int8"):
            return (f"quantization.backend is {config.backend}, export.format compressed-tensors writes the fake or "
                    "int8 backend's layers: use export.format fake-quant")
        if config.weights is None:
            return "quantization.weights is null, export.format compressed-tensors needs quantized weights: use fake-quant"
        return None

    def write(self, result: "QuantizationResult", folder: Path) -> dict[str, Any]:
        problem = self.check(result.recipe.quantization)
        if problem is not None:
            raise UserError(problem)
        kv_cache = kv_cache_export(result)
        save_compressed_tensors(result.model, result.recipe.quantization, folder, kv_cache)
        return {"kv_cache_tensors": sorted(kv_cache[1])}

    def read(self, folder: Path, model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = io.load_tensors(folder / io.WEIGHTS)
        for key in manifest["quantization"].get("kv_cache_tensors", []):
            tensors.pop(key, None)  # their method restores them from methods.safetensors
        for name, module in model.named_modules():
            if isinstance(module, FakeQuantLinear):
                restore_fake_layer(tensors, name, module, folder / io.WEIGHTS)
        return tensors


EXPORT_FORMATS.register("compressed-tensors")(CompressedTensorsExport())
