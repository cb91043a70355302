"""The KV cache scheme: how a causal LM's keys and values are quantized, the one object the
recipe's `kv_cache:` section validates into and that the cache, the static-scale calibration and
the exports read. Torch-free, so a recipe validates without importing any implementation.

Modelled on compressed-tensors' `kv_cache_scheme` (one QuantizationArgs for keys and values):
`bits`, a granularity for keys and for values, `scales` dynamic or static, plus what a
compressed-tensors scheme cannot say: the groups and residual window of a dynamic cache, outliers,
pre-RoPE keys and the attention sinks kept in full precision.

* `scales: dynamic` (the default): `SinkQuantizedCache` computes each group's range as tokens
  arrive (KIVI / KVQuant; quantsink.kv.cache says exactly how). Keys `per_channel` or
  `per_token`, values `per_token`; `group_size`, `residual_length`, `outlier_fraction`,
  `keys.pre_rope`, `sinks` and `exact_layers` (decoder layers kept in full precision) apply. `keys.ranges: calibrated` gives per-channel keys one range
  per channel calibrated offline with `observer` instead (KVQuant; quantsink.methods.kv_static).
* `scales: static`: one symmetric scale per layer (`per_tensor`, the default) or per key/value
  head (`per_head`) for the keys and for the values, calibrated once on the calibration text
  with `observer` (quantsink.methods.kv_static) and applied where each attention hands its cache
  the post-RoPE keys and values; what llm-compressor writes as `kv_cache_scheme` and vLLM serves.
  `type: int` (2-8 bits) or `float` (fp8 e4m3, 8 bits: what vLLM's fp8 KV cache takes). With
  `sinks` (pfn or kvsink) the sinks are left out of the calibrated range, so one massive key no
  longer widens every other token's grid; `sinks.at_inference` says what becomes of them then:
  `exact` (the default) keeps them in full precision, as quantsink's dynamic cache does;
  `quantized` puts them on the narrower grid too (they clip), which is what an engine that knows
  nothing of sinks computes from the exported scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from quantsink.registry import KV_CACHE_BACKENDS, normalise
from quantsink.schema import ObserverName, PositiveInt, Schema, registered_in


class KVGranularity(str, Enum):
    per_channel = "per_channel"
    per_token = "per_token"
    per_tensor = "per_tensor"
    per_head = "per_head"


class KVScales(str, Enum):
    dynamic = "dynamic"
    static = "static"


class KVType(str, Enum):
    int = "int"
    float = "float"  # fp8 e4m3 (torch.float8_e4m3fn), compressed-tensors' `type: float` at 8 bits


class SinkMethod(str, Enum):
    none = "none"
    pfn = "pfn"
    kvsink = "kvsink"


DYNAMIC_KEYS = ("per_channel", "per_token")
STATIC_GRANULARITIES = ("per_tensor", "per_head")
# what a static scheme calls a granularity in compressed-tensors (QuantizationStrategy)
COMPRESSED_TENSORS_STRATEGIES = {"per_tensor": "tensor", "per_head": "attn_head"}
# the fields that only a dynamic cache reads (a static scheme leaves them at their defaults)
DYNAMIC_ONLY = ("group_size", "residual_length", "outlier_fraction")


class SinkProfiling(Schema):
    """How the kvsink predictor finds the outlier channel and picks the sinks
    (quantsink.methods.kvsink says why each default is what it is).

    `massive_ratio`: a channel whose peak is this many times a typical token's RMS is massive;
    with none stable, profiling takes the strongest channels it finds and warns. `min_score`:
    a token is offered as a sink only if its score is at least this many times that RMS; 0 is
    the paper's plain top-k. `prefill`: `stream` decides each forward call's tokens at once,
    `hold` keeps a prompt fed in several calls exact and takes its top-k when it ends. `score`:
    `channel`, |h| in the strongest stable channel (the paper); `norm`, the L2 norm over all
    the stable channels."""

    # Sun et al.'s massive activations are ~1e3-1e4x a typical activation (Llama-2-7B: 2,500 vs <1)
    massive_ratio: Annotated[float, Field(gt=1.0)] = 100.0
    stable_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    min_score: Annotated[float, Field(ge=0.0)] = 0.0
    prefill: Literal["stream", "hold"] = "stream"
    score: Literal["channel", "norm"] = "channel"


class KVSinks(Schema):
    """Which tokens keep their K/V in full precision and out of every scale: none; pfn, the first
    `num_sinks` real tokens of each row; kvsink, the `num_sinks` predicted from the outlier channel
    (`profile` tunes the profiler). `at_inference` (static scales only; a dynamic cache always
    keeps its sinks exact): `exact` keeps the sinks out of the static quantization at inference as
    they were out of its calibration; `quantized` quantizes them with the scales calibrated
    without them, as an engine loading the export does."""

    method: SinkMethod = SinkMethod.none
    num_sinks: PositiveInt = 5
    profile: Optional[SinkProfiling] = None
    at_inference: Literal["exact", "quantized"] = "exact"

    @model_validator(mode="after")
    def _profile_is_kvsinks(self) -> "KVSinks":
        if self.profile is not None and self.method != SinkMethod.kvsink:
            raise ValueError(f"profile tunes the kvsink predictor; method {self.method} has none, remove it")
        return self


class KVKeys(Schema):
    """`ranges` of dynamic per-channel keys: `group`, each group's own min and max (KIVI);
    `calibrated`, one range per channel of each layer, observed offline on the calibration text
    over the tokens the cache quantizes (KVQuant; the kv-static method calibrates them), so each
    key is quantized as it leaves the residual window, without waiting for its group."""

    granularity: KVGranularity = KVGranularity.per_channel
    pre_rope: bool = False
    ranges: Literal["group", "calibrated"] = "group"


class KVValues(Schema):
    # KIVI / KVQuant: dynamic values are quantized per token (never per channel: they are read per token)
    granularity: Literal["per_token", "per_tensor", "per_head"] = "per_token"


@dataclass(frozen=True)
class BackendSupport:
    """What a KV cache backend (quantsink.kv.backends) can run, declared here so that a recipe is
    checked against it without importing the backend."""

    bits: tuple[int, ...]
    scales: tuple[str, ...] = ("dynamic",)
    key_granularities: tuple[str, ...] = DYNAMIC_KEYS
    sinks: bool = True
    pre_rope: bool = True
    outliers: bool = True
    calibrated_keys: bool = True
    exact_layers: bool = True

    def incompatibility(self, name: str, scheme: "KVCacheScheme") -> Optional[str]:
        """Why backend `name` cannot run `scheme` (one line with the fix), or None."""
        keys = scheme.keys.granularity
        unsupported = [
            (scheme.scales not in self.scales, f"scales {scheme.scales}"),
            (scheme.sinks.method != "none" and not self.sinks, f"sinks.method {scheme.sinks.method}"),
            (scheme.keys.pre_rope and not self.pre_rope, "keys.pre_rope"),
            (scheme.outlier_fraction > 0 and not self.outliers, "outlier_fraction"),
            (scheme.keys.ranges == "calibrated" and not self.calibrated_keys, "keys.ranges calibrated"),
            (bool(scheme.exact_layers) and not self.exact_layers, "exact_layers"),
            (scheme.scales == "dynamic" and keys not in self.key_granularities,
             f"usable keys.granularity {keys} (set {' or '.join(self.key_granularities)})"),
        ]
        for present, what in unsupported:
            if present:
                return f"backend {name} has no {what}: use backend quantsink"
        if scheme.bits not in self.bits:
            supported = ", ".join(str(bits) for bits in self.bits)
            return f"bits {scheme.bits}: the {name} KV cache stores {supported} bits; pick one of those"
        return None


BACKEND_SUPPORT = {
    "quantsink": BackendSupport(bits=(2, 3, 4, 8, 16), scales=("dynamic", "static")),
    # transformers' QuantizedCache with optimum-quanto: keys per token (axis 0) or per channel
    # (axis -1, over whole groups of tokens only: quantsink.kv.backends refuses the rest when it runs)
    "transformers-quanto": BackendSupport(bits=(2, 4), sinks=False, pre_rope=False, outliers=False, calibrated_keys=False,
                                          exact_layers=False),
}

# the methods a scheme implies (quantsink.methods registers them), and the field that asks for each
IMPLIED_METHODS = {"kv-static": "kv_cache.scales: static or kv_cache.keys.ranges: calibrated",
                   "kvsink": "kv_cache.sinks.method: kvsink"}


class KVCacheScheme(Schema):
    """How the KV cache of a causal LM is quantized (module docstring): `quantsink.kv_cache(model)`
    builds its cache, `SinkQuantizedCache(scheme)` takes it directly."""

    backend: Annotated[str, registered_in(KV_CACHE_BACKENDS)] = "quantsink"
    bits: int = 4
    type: KVType = KVType.int
    scales: KVScales = KVScales.dynamic
    keys: KVKeys = Field(default_factory=KVKeys)
    values: KVValues = Field(default_factory=KVValues)
    group_size: PositiveInt = 64
    residual_length: Annotated[int, Field(ge=0)] = 128
    outlier_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    observer: ObserverName = "minmax"
    sinks: KVSinks = Field(default_factory=KVSinks)
    # decoder layers (0-based) whose keys and values the dynamic cache keeps in full precision:
    # the ones whose KV alone costs most (quantsink inspect measures and recommends them)
    exact_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)

    @field_validator("exact_layers")
    @classmethod
    def _each_exact_layer_once(cls, layers: list[int]) -> list[int]:
        repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
        if repeated:
            raise ValueError(f"exact_layers names layer {repeated[0]} more than once: list each layer once")
        return sorted(layers)

    @model_validator(mode="before")
    @classmethod
    def _static_scales_are_per_tensor_unless_told(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("scales") != "static":
            return data
        for part in ("keys", "values"):
            given = data.get(part) or {}
            if isinstance(given, dict) and "granularity" not in given:
                data = {**data, part: {**given, "granularity": "per_tensor"}}
        return data

    @model_validator(mode="after")
    def _scales_fit_the_rest(self) -> "KVCacheScheme":
        keys, values = self.keys.granularity, self.values.granularity
        if self.scales == "dynamic":
            if self.type != "int":
                raise ValueError(f"type {self.type} needs scales: static; a dynamic cache stores integer codes")
            if self.sinks.at_inference != "exact":
                raise ValueError("sinks.at_inference quantized applies to static scales; a dynamic cache keeps its sinks "
                                 "exact: remove it or set scales: static")
            if keys not in DYNAMIC_KEYS:
                raise ValueError(f"keys.granularity {keys} needs scales: static; dynamic keys are per_channel or per_token")
            if values != "per_token":
                raise ValueError(f"values.granularity {values} needs scales: static; dynamic values are per_token")
            calibrated = self.keys.ranges == "calibrated"
            if calibrated and keys != "per_channel":
                raise ValueError(f"keys.ranges calibrated are ranges of key channels, not of keys.granularity {keys}: "
                                 "set keys.granularity per_channel")
            if self.observer != "minmax" and not calibrated:
                raise ValueError(f"observer {self.observer} calibrates static scales or key ranges; dynamic ones take each "
                                 "group's range: remove it, or set scales: static or keys.ranges: calibrated")
            return self
        if keys not in STATIC_GRANULARITIES or keys != values:
            raise ValueError(f"static scales are per_tensor or per_head, the same for keys and values (compressed-tensors "
                             f"has one strategy), got keys {keys} and values {values}: set both to one of those (per-channel "
                             "keys calibrated offline: scales dynamic, keys.ranges calibrated)")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits {self.bits}: static scales quantize to 2-8 bits; pick one of those")
        if self.type == "float" and self.bits != 8:
            raise ValueError(f"type float is fp8 (e4m3), 8 bits, got bits {self.bits}: set bits 8, or type int")
        if self.type == "float" and normalise(self.observer) == "mse":
            raise ValueError("observer mse searches the clipping of an integer grid; type float takes minmax or percentile")
        sinks = self.sinks
        if sinks.method == "none" and sinks.at_inference != "exact":
            raise ValueError("sinks.at_inference says what becomes of the sinks left out of the static scales, and "
                             "sinks.method is none: set a sinks.method (pfn or kvsink) or remove at_inference")
        if sinks.profile is not None and sinks.profile.prefill != "stream":
            raise ValueError("sinks.profile.prefill hold: static scales decide each forward call's sinks as it runs; "
                             "remove prefill or use scales: dynamic")
        defaults = type(self).model_fields
        dynamic_only = [name for name in DYNAMIC_ONLY if getattr(self, name) != defaults[name].default]
        dynamic_only += [what for present, what in ((self.keys.pre_rope, "keys.pre_rope"), (bool(self.exact_layers), "exact_layers"),
                                                    (self.keys.ranges != "group", "keys.ranges"))
                         if present]
        if dynamic_only:
            raise ValueError(f"{dynamic_only[0]} applies to dynamic scales; static ones quantize every post-RoPE token "
                             "but the sinks with its layer's scale: remove it or set scales: dynamic")
        return self

    @model_validator(mode="after")
    def _backend_supports_it(self) -> "KVCacheScheme":
        # a backend registered without a declared support is checked by nothing but its own build
        support = BACKEND_SUPPORT.get(normalise(self.backend))
        problem = support.incompatibility(self.backend, self) if support is not None else None
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def quantizes(self) -> bool:
        return self.bits < 16

    def outliers_per_vector(self, length: int) -> int:
        """How many entries of a `length`-entry vector dense-and-sparse keeps exact: the
        outlier_fraction of it to the nearest integer (halves up), at least 1 when outlier_fraction
        > 0. quantsink.kv.cache says what a vector is."""
        if not self.outlier_fraction:
            return 0
        return max(1, math.floor(self.outlier_fraction * length + 0.5))

    def implied_methods(self) -> list[tuple[str, Any]]:
        """(method name, options) of the methods this scheme needs run on the model, in order:
        kvsink profiles the sink predictor, then kv-static (its options: this scheme) calibrates
        static scales or key ranges, the latter on the tokens the predicted sinks leave."""
        methods: list[tuple[str, Any]] = []
        if self.sinks.method == "kvsink":
            methods.append(("kvsink", self.sinks.profile or SinkProfiling()))
        if self.scales == "static" or self.keys.ranges == "calibrated":
            methods.append(("kv-static", self))
        return methods

    def compressed_tensors(self) -> dict[str, Any]:
        """This static scheme as compressed-tensors' `kv_cache_scheme` (QuantizationArgs fields)."""
        return {"num_bits": self.bits, "type": self.type, "symmetric": True,
                "strategy": COMPRESSED_TENSORS_STRATEGIES[self.keys.granularity], "dynamic": False}

    def describe(self) -> str:
        if self.scales == "static":
            number = "fp8 e4m3" if self.type == "float" else f"{self.bits}-bit"
            sinks = "" if self.sinks.method == "none" else (
                f", {self.sinks.method}-{self.sinks.num_sinks} sinks out of the scales, {self.sinks.at_inference} at inference")
            return f"{self.backend} {number}, static {self.keys.granularity} scales of keys and values ({self.observer}){sinks}"
        sinks = self.sinks.method if self.sinks.method == "none" else f"{self.sinks.method}-{self.sinks.num_sinks}"
        keys = f"keys {self.keys.granularity}{' pre-RoPE' if self.keys.pre_rope else ''}"
        keys += f" in calibrated ranges ({self.observer})" if self.keys.ranges == "calibrated" else ""
        outliers = f", {self.outlier_fraction:.1%} outliers per vector" if self.outlier_fraction else ""
        exact = f", layers {self.exact_layers} exact" if self.exact_layers else ""
        return (
            f"{self.backend} {self.bits}-bit, {keys}, values per_token, groups of {self.group_size}, "
            f"residual {self.residual_length}{outliers}, sinks {sinks}{exact}"
        )
