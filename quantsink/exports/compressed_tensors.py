"""The `compressed-tensors` export: a Hugging Face folder that transformers loads with
`from_pretrained` (when the compressed-tensors package is installed) and vLLM serves.

What it writes, as llm-compressor does:
- config.json: the model's config plus `quantization_config`: quant_method
  "compressed-tensors", one config group targeting `Linear`, `ignore` naming every Linear left in
  float, `kv_cache_scheme` (null unless a method exports one), quantization_status `compressed`,
  and the format compressed-tensors' own `infer_module_format` picks for the scheme, also set
  on the group: loaders infer each layer's format from its scheme and never read the top-level
  one, so a layout other than the inferred one does not load. That is `int-quantized` when
  inputs are quantized and `pack-quantized` for weight-only;
- model.safetensors: each quantized Linear (the backend's integers and scales, as its
  `quantized_linears` offers them) with its weight as int8 `weight` (int-quantized) or as
  `weight_packed` (the integers packed into int32 by compressed-tensors' `pack_to_int32`) and
  `weight_shape` (pack-quantized), then `weight_scale`, `weight_zero_point` (asymmetric only),
  `input_scale` and `input_zero_point` (static inputs; the zero point only when asymmetric),
  `bias`; KV-cache scales as their method names them (one pair for each attention
  compressed-tensors hooks, no other); everything else as the model holds it.

pack-quantized packs asymmetric zero points per channel or per group too, and transformers
cannot load those (compressed-tensors 0.20 builds the model's zero points unpacked, then unpacks
what it loaded; llm-compressor issue 1618), so asymmetric weight-only exports other than per
tensor are refused.

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

from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from quantsink import io
from quantsink.errors import CheckpointError, UserError
from quantsink.exports.base import Artifact, ExportFormat, Writes, replace_layers
from quantsink.models.base import Adapter
from quantsink.models.capabilities import TransformersCheckpoint
from quantsink.quantizers.base import QuantizedLinear, Quantizer
from quantsink.quantizers.functional import signed_grid_shift
from quantsink.recipe import ActivationArgs, QuantizationConfig, WeightArgs
from quantsink.registry import EXPORT_FORMATS

STRATEGIES = {"per_channel": "channel", "per_tensor": "tensor", "per_group": "group", "per_token": "token"}

# the entries of one layer, as compressed-tensors names them
LAYER_KEYS = ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point", "bias")


@runtime_checkable
class CompressedTensorsKVCache(Protocol):
    """The hook for a method whose KV-cache quantization compressed-tensors can state."""

    def compressed_tensors_kv_cache(self, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The `kv_cache_scheme` (compressed-tensors QuantizationArgs fields, e.g. {num_bits: 8,
        type: int, symmetric: true, strategy: tensor, dynamic: false}) and its tensors, named as
        the Hugging Face model names them (`model.layers.0.self_attn.k_scale`, `.v_scale`)."""


def weight_scheme(args: WeightArgs) -> dict[str, Any]:
    return {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": STRATEGIES[args.granularity],
            "group_size": args.group_size, "dynamic": False}


def input_scheme(args: ActivationArgs) -> dict[str, Any]:
    return {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": STRATEGIES[args.granularity],
            "dynamic": args.dynamic}


def config_group(config: QuantizationConfig) -> dict[str, Any]:
    group = {"targets": ["Linear"], "weights": weight_scheme(config.weights)}
    if config.activations is not None:
        group["input_activations"] = input_scheme(config.activations)
    return group


def compression_format(config: QuantizationConfig) -> str:
    """The format compressed-tensors infers for a Linear quantized as `config`, as llm-compressor
    picks it: the layout a loader expects."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    return infer_module_format(nn.Linear, QuantizationScheme.model_validate(config_group(config))).value


def quantization_config(config: QuantizationConfig, ignore: list[str], kv_cache_scheme: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The `quantization_config` of config.json, validated by compressed-tensors' own schema."""
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    layout = compression_format(config)
    return CTConfig.model_validate({
        "config_groups": {"group_0": {**config_group(config), "format": layout}},
        "ignore": ignore,
        "kv_cache_scheme": kv_cache_scheme,
        "format": layout,
        "quantization_status": "compressed",
    })


def compressed_layer(linear: QuantizedLinear, layout: str) -> dict[str, torch.Tensor]:
    """A quantized Linear's tensors under compressed-tensors' names, in format `layout`."""
    from compressed_tensors.compressors import pack_to_int32

    weights, inputs = linear.weight_args, linear.activation_args
    shift = signed_grid_shift(weights.bits, weights.symmetric)
    codes = (linear.weight.to(torch.int32) - shift) if shift else linear.weight  # an int8 backend's codes are not copied
    tensors = {"weight": codes.to(torch.int8), "weight_scale": linear.weight_scale}
    if not weights.symmetric:
        tensors["weight_zero_point"] = (linear.weight_zero_point - shift).to(torch.int8)
    if linear.input_scale is not None:
        tensors["input_scale"] = linear.input_scale
        if not inputs.symmetric:
            tensors["input_zero_point"] = (linear.input_zero_point - signed_grid_shift(inputs.bits, False)).to(torch.int8)
    if linear.bias is not None:
        tensors["bias"] = linear.bias
    if layout == "pack-quantized":
        weight = tensors.pop("weight")
        tensors["weight_packed"] = pack_to_int32(weight, weights.bits)
        tensors["weight_shape"] = torch.tensor(weight.shape)
    return tensors


def unpack_layer(tensors: dict[str, torch.Tensor], name: str, expected: QuantizedLinear, origin: Path) -> None:
    """Turn a pack-quantized layer's `weight_packed` and `weight_shape` in `tensors` back into the
    int-quantized `weight` (int8 on the signed grid); other layers are left as they are."""
    from compressed_tensors.compressors import unpack_from_int32

    packed = tensors.pop(f"{name}.weight_packed", None)
    if packed is None:
        return
    bits, (rows, columns) = expected.weight_args.bits, expected.weight.shape
    shape = tensors.pop(f"{name}.weight_shape", None)
    packed_columns = -(-columns * bits // 32)
    if packed.dtype != torch.int32 or packed.shape != (rows, packed_columns) or shape is None or shape.tolist() != [rows, columns]:
        raise CheckpointError(
            f"{origin}: {name}.weight_packed must be int32 {(rows, packed_columns)} with weight_shape "
            f"{[rows, columns]}, got {packed.dtype} {tuple(packed.shape)} and "
            f"{None if shape is None else shape.tolist()}; re-export it"
        )
    tensors[f"{name}.weight"] = unpack_from_int32(packed, bits, expected.weight.shape)


def read_layer(tensors: dict[str, torch.Tensor], name: str, expected: QuantizedLinear, origin: Path) -> Optional[QuantizedLinear]:
    """A layer's int-quantized entries, taken out of `tensors`, as quantsink's integers and scales;
    None (the entries left for the loader to report) when its weight or scale is missing."""
    weight, scale = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    if weight is None or scale is None:
        return None
    if weight.dtype != torch.int8 or weight.shape != expected.weight.shape or scale.shape != expected.weight_scale.shape:
        raise CheckpointError(
            f"{origin}: {name}.weight must be int8 {tuple(expected.weight.shape)} with weight_scale "
            f"{tuple(expected.weight_scale.shape)}, got {weight.dtype} {tuple(weight.shape)} and "
            f"{tuple(scale.shape)}; re-export it"
        )
    stored = {key: tensors.pop(f"{name}.{key}") for key in LAYER_KEYS if f"{name}.{key}" in tensors}
    weights, inputs = expected.weight_args, expected.activation_args
    shift = signed_grid_shift(weights.bits, weights.symmetric)
    zero_point = stored.get("weight_zero_point")
    input_scale = stored.get("input_scale") if expected.input_scale is not None else None
    input_zero_point = None
    if input_scale is not None:
        stored_zero_point = stored.get("input_zero_point")
        input_zero_point = (torch.zeros_like(input_scale) if stored_zero_point is None
                            else stored_zero_point.to(input_scale.dtype) + signed_grid_shift(inputs.bits, inputs.symmetric))
    return QuantizedLinear(
        weight=weight.to(torch.int32) + shift, weight_scale=scale,
        weight_zero_point=torch.zeros_like(scale) if zero_point is None else zero_point.to(scale.dtype) + shift,
        input_scale=input_scale, input_zero_point=input_zero_point, bias=stored.get("bias"),
        weight_args=weights, activation_args=inputs,
    )


def kv_cache_export(artifact: Artifact) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]]:
    """The KV-cache scheme and tensors of the method that exports one, else (None, {})."""
    exporters = [method for method in artifact.methods if isinstance(method, CompressedTensorsKVCache)]
    if len(exporters) > 1:
        raise UserError(f"methods {[m.name for m in exporters]} each quantize the KV cache: keep one")
    if not exporters:
        return None, {}
    return exporters[0].compressed_tensors_kv_cache(artifact.adapter)


def check_kv_cache_targets(model: nn.Module, kv_tensors: dict[str, torch.Tensor]) -> None:
    """A kv_cache_scheme applies to every attention that compressed-tensors recognises, and to no
    other: the KV tensors must name exactly those, or a loader would skip some scales and run
    other attentions on uninitialised ones."""
    from compressed_tensors.quantization import is_cached_attention_module

    recognised = {name for name, module in model.named_modules() if is_cached_attention_module(module)}
    named = {key.rpartition(".")[0] for key in kv_tensors}
    if named != recognised:
        unknown = sorted(named - recognised)
        if unknown:
            from quantsink.models.causal_lm import find_cache_keyword

            keyword = find_cache_keyword(model.get_submodule(unknown[0]))
            # compressed-tensors 0.20 predates transformers 5.24's `cache` keyword
            problem = (f"{unknown[0]} is not an attention it recognises (compressed-tensors {version('compressed-tensors')} "
                       "hooks k_proj/v_proj or qkv_proj attentions whose forward takes past_key_values; this one takes "
                       f"the cache as {keyword!r} under transformers {version('transformers')})")
        else:
            problem = f"{sorted(recognised - named)[0]} has no KV scales"
        raise UserError(f"compressed-tensors applies a kv_cache_scheme to the attentions it recognises, and {problem}: "
                        "use export.format int8 or fake-quant")


def save_compressed_tensors(
    adapter: Adapter,
    quantizer: Quantizer,
    folder: Path,
    kv_cache: tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]] = (None, {}),
) -> None:
    """Write config.json and model.safetensors for a transformers model whose Linears `quantizer`
    quantized; `kv_cache` is a `kv_cache_scheme` and its tensors."""
    from compressed_tensors.compressors import ModelCompressor

    config = quantizer.config
    problem = COMPRESSED_TENSORS.incompatibility(config)
    if problem is not None:
        raise UserError(problem)
    if not isinstance(adapter, TransformersCheckpoint):
        raise UserError(f"export.format compressed-tensors needs a transformers model, not a {type(adapter.model).__name__}: "
                        "use export.format int8 or fake-quant")
    model = adapter.model
    linears = quantizer.quantized_linears(model)
    if adapter.tied_output_projection() in linears:
        raise UserError("the quantized output projection is tied to the input embeddings, which stay in float: "
                        "add it to quantization.ignore (e.g. lm_head)")
    kv_cache_scheme, kv_tensors = kv_cache
    if kv_cache_scheme is not None:
        check_kv_cache_targets(model, kv_tensors)
    layout = compression_format(config)
    tensors = replace_layers(model.state_dict(), {name: compressed_layer(linear, layout) for name, linear in linears.items()})
    tensors.update(kv_tensors)
    io.save_tensors(tensors, folder / io.WEIGHTS)

    adapter.save_transformers_config(folder)
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    quantization = quantization_config(config, ignore, kv_cache_scheme)
    ModelCompressor(quantization_config=quantization).update_config(str(folder))


class CompressedTensorsExport(ExportFormat):
    writes = Writes(integer_layers=True, weights=True)

    def scheme_incompatibility(self, config: QuantizationConfig) -> Optional[str]:
        weights = config.weights
        if compression_format(config) == "pack-quantized" and not weights.symmetric and weights.granularity != "per_tensor":
            return (f"quantization.weights.symmetric is false with {weights.granularity} weights and no activations, whose "
                    "packed zero points transformers cannot load from compressed-tensors: use symmetric: true, "
                    "granularity per_tensor, or export.format fake-quant")
        return None

    def write(self, artifact: Artifact, folder: Path) -> dict[str, Any]:
        kv_cache = kv_cache_export(artifact)
        save_compressed_tensors(artifact.adapter, artifact.quantizer, folder, kv_cache)
        return {"kv_cache_tensors": sorted(kv_cache[1])}

    def read(self, folder: Path, quantizer: Optional[Quantizer], model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = io.load_tensors(folder / io.WEIGHTS)
        for key in manifest["quantization"].get("kv_cache_tensors", []):
            tensors.pop(key, None)  # their method restores them from methods.safetensors
        origin = folder / io.WEIGHTS
        for name, expected in quantizer.quantized_linears(model).items():
            unpack_layer(tensors, name, expected, origin)
            linear = read_layer(tensors, name, expected, origin)
            if linear is not None:
                tensors.update({f"{name}.{key}": value for key, value in quantizer.linear_state(linear).items()})
        return tensors


COMPRESSED_TENSORS = EXPORT_FORMATS.register("compressed-tensors")(CompressedTensorsExport("compressed-tensors"))
