"""The recommended recipe, each choice with the measurement behind it.

Starting point: the shipped recipes' defaults for the family, W8A8 (int8 per-channel weights,
per-tensor static activations, min-max) for encoders and a 2-bit KVQuant-style cache (keys per
channel in groups of 16, values per token, no residual window) for causal LMs. Then:

* vision encoders with massive tokens: RegCache, its sensitive layer l_q fixed to the one
  measured here by RegCache's own rule (quantsink.methods.regcache.sensitivity), the rest
  searched; candidate_top_k the largest of CANDIDATE_LADDER not above the massive tokens the
  calibration set has at l_q (more candidates than sinks dilute the registers);
* text encoders with outlier tokens: sink-tokens (their token texts are the reason);
* causal LMs: KVSink, `num_sinks` at least the paper's 5 and as many as the most massive tokens
  one sequence has, `min_score` a tenth of the strongest sink's score so that only sink-like
  tokens take the slots; the layers whose KV alone costs at least KV_KEEP_SHARE of what
  quantizing every layer costs stay in full precision (`kv_cache.exact_layers`);
* `ignore`: every Linear that alone costs at least IGNORE_SHARE of what quantizing all of them
  costs at W8A8 and whose input has no massive activation (RegCache and sink-tokens can only
  help those that do)."""
from __future__ import annotations

from typing import Any, Optional

from quantsink.methods.kvsink import SinkProfile
from quantsink.methods.regcache.profile import MASSIVE_RATIO
from quantsink.recipe import QuantizationConfig, Recipe

CANDIDATE_LADDER = (100, 50, 25, 10, 5)
IGNORE_SHARE = 0.5
SINK_SHARE = 0.1  # a token scoring at least this share of the strongest sink is a sink
MIN_SINKS = 5  # KVSink-5, the paper's
MAX_SINKS = 32
KV_KEEP_SHARE = 0.25  # a layer whose KV alone costs this share of all layers' is worth keeping exact

BASE_KV = {
    "backend": "quantsink", "bits": 2, "keys": {"granularity": "per_channel", "pre_rope": False},
    "values": {"granularity": "per_token"}, "group_size": 16, "residual_length": 0, "outlier_fraction": 0.0,
}


def calibration_section(data: str, num_samples: int, seed: int, seq_len: Optional[int]) -> dict[str, Any]:
    section = {"data": data, "num_samples": max(num_samples, 16), "batch_size": 8, "seed": seed, "holdout": 16}
    if seq_len is not None:
        section["seq_len"] = seq_len
    return section


def ignored_linears(scan: dict[str, dict[str, float]], ratios: dict[str, float], protected: set[str]) -> tuple[list[str], str]:
    """The Linears to leave in full precision (module docstring) and the reason in one line."""
    w8a8 = scan["W8A8"]
    whole = w8a8["all"]
    alone = {name: value for name, value in w8a8.items() if name != "all"}
    worst = max(alone, key=alone.get)
    ignored = [name for name, value in alone.items()
               if value >= IGNORE_SHARE * whole and ratios.get(name, 0.0) < MASSIVE_RATIO and name not in protected]
    if ignored:
        reason = (f"{', '.join(ignored)} alone cost{'s' if len(ignored) == 1 else ''} >= {IGNORE_SHARE:.0%} of the W8A8 "
                  f"damage of the whole model ({whole:.2e}) with no massive input a sink method could remove: kept in full precision")
    else:
        reason = (f"no Linear alone costs {IGNORE_SHARE:.0%} of the whole model's W8A8 damage ({whole:.2e}) without massive "
                  f"inputs; the worst alone is {worst} ({alone[worst]:.2e}, input {ratios.get(worst, 0.0):.1f}x its median token)")
    return ignored, reason


def vision_recipe(name: str, calibration: dict[str, Any], sensitivity: dict[str, Any], massive_at_lq: int,
                  ignored: list[str]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    l_q = sensitivity["block"]
    top_k = next((k for k in CANDIDATE_LADDER if k <= massive_at_lq), CANDIDATE_LADDER[-1])
    regcache = {"sensitive_layer": l_q, "prefix_start": "auto", "num_registers": "auto", "delete_tokens": "auto",
                "candidate_top_k": top_k, "refill": "none"}
    tied = ", ".join(f"{entry['linear']} {entry['damage']:.2e} ({entry['input_outlier_ratio']:.0f}x)" for entry in sensitivity["tied"])
    reasons = [
        {"choice": f"methods.regcache.sensitive_layer: {l_q}",
         "reason": f"{sensitivity['linear']} is the most sensitive Linear with massive inputs (A8 damage alone; tied: {tied}); "
                   f"rule: {sensitivity['rule']}"},
        {"choice": f"methods.regcache.candidate_top_k: {top_k}",
         "reason": f"{massive_at_lq} massive tokens (> {MASSIVE_RATIO:g}x the median) at block {l_q}'s output over the "
                   f"calibration set; more candidates than sinks dilute the registers"},
        {"choice": "methods.regcache prefix_start, num_registers, delete_tokens: auto",
         "reason": "searched with the quantizer in the loop on a validation split, naive and each part alone included"},
    ]
    return _recipe(name, calibration, [{"regcache": regcache}], ignored), reasons


def text_encoder_recipe(name: str, calibration: dict[str, Any], outliers: Optional[dict[str, Any]], ignored: list[str],
                        no_outliers: Optional[str]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    if outliers is None:
        return _recipe(name, calibration, [], ignored), [{"choice": "methods: []", "reason": no_outliers or "no outlier token"}]
    emergence = next(layer for layer in outliers["layers"] if layer["linear"] == outliers["emergence"])
    reasons = [{"choice": "methods: sink-tokens {outlier_ratio: 5.0, protect: with_outliers}",
                "reason": f"outlier tokens {emergence['top_tokens']} emerge at {outliers['emergence']}'s input "
                          f"({emergence['max_over_median']:.1f}x the median token), predicted by channel {outliers['channel']} "
                          f"({outliers['separation']:.1f}x apart); {len(outliers['protected'])} Linears protected"}]
    return _recipe(name, calibration, [{"sink-tokens": {"outlier_ratio": 5.0, "protect": "with_outliers"}}], ignored), reasons


def llm_recipe(name: str, calibration: dict[str, Any], profile: SinkProfile, most_sinks: int,
               kv: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    num_sinks = min(MAX_SINKS, max(MIN_SINKS, most_sinks))
    min_score = SINK_SHARE * profile.peak / profile.scale
    per_layer = kv["per_layer_kl"]["2"]
    whole = kv["all_layers_kl"]["2"]["none"]
    keep = [layer for layer, kl in enumerate(per_layer) if kl >= KV_KEEP_SHARE * whole]
    compared = kv["all_layers_kl"]["2"]
    sinks = {"method": "kvsink", "num_sinks": num_sinks, "profile": {"min_score": round(min_score, 3)}}
    kv_cache = {**BASE_KV, "sinks": sinks, **({"exact_layers": keep} if keep else {})}
    recipe = {"name": name, "calibration": calibration, "kv_cache": kv_cache}
    channels = ", ".join(f"{channel} ({ratio:.1f}x)" for channel, ratio in zip(profile.channels, profile.ratios))
    reasons = [
        {"choice": f"kv_cache.sinks: kvsink, num_sinks {num_sinks}",
         "reason": f"stable outlier channels {channels} a typical token's RMS emerge at block {profile.emergence_layer}; "
                   f"up to {most_sinks} tokens of one sequence score >= {SINK_SHARE:.0%} of the strongest sink "
                   f"(KVSink-{MIN_SINKS} is the paper's minimum, {MAX_SINKS} the most kept); 2-bit KL over all layers: "
                   + ", ".join(f"{key} {value:.4f}" for key, value in compared.items())},
        {"choice": f"kv_cache.sinks.profile.min_score: {min_score:.3g}",
         "reason": f"{SINK_SHARE:.0%} of the strongest sink's score ({profile.peak / profile.scale:.1f}x the token RMS at block "
                   f"{profile.emergence_layer}): only sink-like tokens take the slots, later sinks find one free"},
        {"choice": f"kv_cache.exact_layers: {keep if keep else 'none'}",
         "reason": ("2-bit KL with only that layer quantized: " + ", ".join(f"{layer}: {kl:.4f}" for layer, kl in enumerate(per_layer))
                    + f"; a layer is kept in full precision when it alone costs >= {KV_KEEP_SHARE:.0%} of all layers' {whole:.4f} "
                      f"(each holds 16-bit keys and values: drop it from exact_layers to save its {1 / len(per_layer):.0%} of the cache)")},
    ]
    return recipe, reasons


def _recipe(name: str, calibration: dict[str, Any], methods: list[dict[str, Any]], ignored: list[str]) -> dict[str, Any]:
    quantization = QuantizationConfig().model_dump(mode="json")
    quantization["ignore"] = [f"re:{_escaped(linear)}$" for linear in ignored]
    return {"name": name, "calibration": calibration, "methods": methods, "quantization": quantization,
            "export": {"format": "fake-quant"}}


def _escaped(name: str) -> str:
    return name.replace(".", r"\.")


def validated(recipe: dict[str, Any]) -> Recipe:
    return Recipe.from_dict(recipe, origin="the recommended recipe")


def to_yaml(recipe: dict[str, Any], reasons: list[dict[str, str]], model: str) -> str:
    """recommended.yaml: the reasons as comments above the recipe, which validates as it is."""
    import yaml

    lines = [f"# Recommended by `quantsink inspect {model}`; each choice with what was measured:"]
    for entry in reasons:
        lines.append(f"# - {entry['choice']}")
        lines += [f"#     {line}" for line in _wrapped(entry["reason"])]
    lines.append(f"#   quantsink quantize {model} recommended.yaml -o out/{recipe['name']}")
    return "\n".join(lines) + "\n" + yaml.safe_dump(recipe, sort_keys=False)


def _wrapped(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
