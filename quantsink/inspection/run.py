"""`quantsink.inspect(model, calibration) -> Inspection`: the stages of an inspection.

    data        calibration samples, preprocessed one batch at a time as the pass reaches them
    pass        the streaming hooks of quantsink.inspection.collect over every sample
    profile     the family's own method profile: KVSink's for a causal LM (emergence layer,
                channels, predicted sinks), sink-tokens' for a text encoder
    sensitivity one Linear at a time (A8 for RegCache's l_q, W8A8, W4A8) and, for a causal LM,
                one KV layer at a time at 4 and 2 bits, on the first SENSITIVITY_SAMPLES samples
                (LLM_SENSITIVITY_SAMPLES sequences)
    recommend   the recipe and its reasons (quantsink.inspection.recommend)

What a family offers is read from its capabilities (quantsink.models.capabilities): a KV cache
host is a causal LM, an editable encoder takes RegCache, patch grids place tokens on the image."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from quantsink.data import batched, load_samples
from quantsink.errors import UserError
from quantsink.inspection import recommend
from quantsink.inspection.collect import InspectionCollector
from quantsink.inspection.sensitivity import ALL, LINEAR_CONFIGS, LinearScan, scan_kv, scan_linears
from quantsink.kv.scheme import KVCacheScheme, SinkProfiling
from quantsink.methods.kvsink import WEAK_CUTOFF, SinkProfile, profile_sinks
from quantsink.methods.regcache.profile import MASSIVE_RATIO
from quantsink.methods.regcache.sensitivity import Sensitivity
from quantsink.methods.sink_tokens import SinkTokensOptions, profile_outliers
from quantsink.models import resolve
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.models.capabilities import EditableEncoder, KVCacheHost, PatchGrids
from quantsink.quantizers.base import target_linears
from quantsink.recipe import QuantizationConfig, Recipe

SHOWN = 4  # samples whose tokens the heatmaps show
SENSITIVITY_SAMPLES = 8
LLM_SENSITIVITY_SAMPLES = 4  # sequences of LLM_SEQ_LEN tokens: 512 predicted tokens per KV trial
LLM_SEQ_LEN = 128  # the shipped causal-LM recipes' calibration length
PFN = 5  # what Preserve-First-N keeps, shown beside the predicted sinks


@dataclass
class Inspection:
    """What `inspect` measured (`data`, inspect.json as it is saved) and the pixels of the shown
    images (for the overlays). `save(dir)` writes the report; `recommend()` the recipe."""

    data: dict[str, Any]
    images: list[np.ndarray] = field(default_factory=list)  # (rows, columns, 3) uint8 per shown image

    def recommend(self) -> Recipe:
        return recommend.validated(self.data["recommended"]["recipe"])

    def save(self, destination: str | os.PathLike) -> Path:
        from quantsink.inspection.report import save_inspection

        return save_inspection(self, Path(destination))


def inspect(
    model: str | os.PathLike | nn.Module | Adapter,
    calibration: Optional[str] = None,
    *,
    num_samples: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    progress: bool = True,
) -> Inspection:
    """Inspect `model` (a spec, an nn.Module, or an Adapter that already wraps one with its
    tokenizer) on `calibration` (as `quantsink quantize --calib` takes it; default the bundled
    data): see the module docstring."""
    adapter = model if isinstance(model, Adapter) else resolve(model)
    data = calibration or "bundled"
    llm = isinstance(adapter, KVCacheHost)
    seq_len = seq_len if seq_len is not None else (LLM_SEQ_LEN if llm else None)
    samples = load_samples(data, adapter.modality, num_samples, 0, seed, seq_len)
    base = QuantizationConfig()
    targets = list(target_linears(adapter.model, base))
    token_texts = getattr(adapter, "token_texts", None)

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], Optional[list[list[str]]]]]:
        for chunk in batched(samples.calibration, batch_size):
            inputs = adapter.preprocess(chunk, max_length=seq_len)
            yield inputs, (token_texts(inputs) if token_texts is not None else None)

    collector = InspectionCollector(adapter, targets, SHOWN)
    collector.run_all(batches())
    blocks = [stream.summary(name) for stream, name in zip(collector.blocks, collector.block_names)]
    ratios = {name: entry.ratio() for name, entry in collector.linears.items()}
    spec = str(model) if isinstance(model, (str, os.PathLike)) else adapter.source.spec  # what the user named
    result: dict[str, Any] = {
        "model": spec,
        "family": adapter.source.family,
        "modality": adapter.modality,
        "kind": "causal-lm" if llm else ("vision" if isinstance(adapter, EditableEncoder) else "text-encoder"),
        "calibration": {"data": samples.description, "samples": len(samples.calibration), "seq_len": seq_len},
        "num_prefix_tokens": adapter.num_prefix_tokens,
        "blocks": blocks,
        "linear_input_ratios": ratios,
        "shown": _shown(adapter, collector),
    }
    images = _shown_images(adapter, collector, samples.calibration) if adapter.modality == "image" else []

    scanned = samples.calibration[:LLM_SENSITIVITY_SAMPLES if llm else SENSITIVITY_SAMPLES]
    subset = [adapter.preprocess(chunk, max_length=seq_len) for chunk in batched(scanned, batch_size)]
    configs = LINEAR_CONFIGS if isinstance(adapter, EditableEncoder) else {k: v for k, v in LINEAR_CONFIGS.items() if k != "A8"}
    scan = scan_linears(adapter, base, subset, configs, progress)
    result["sensitivity"] = {"criterion": "1 - centred cosine of the embeddings to full precision", "samples": scan.samples,
                             "configs": {label: {"weight_bits": w, "activation_bits": a} for label, (w, a) in configs.items()},
                             "scores": scan.scores, "blocks": scan.blocks}
    calibration_section = recommend.calibration_section(data, len(samples.calibration), seed, seq_len)
    name = f"{_slug(spec)}-recommended"
    if llm:
        recipe, reasons = _causal_lm(adapter, result, collector, subset, batches, name, calibration_section, progress)
    else:
        recipe, reasons = _encoder(adapter, result, scan, ratios, batches, name, calibration_section, progress)
    recommend.validated(recipe)
    result["recommended"] = {"recipe": recipe, "reasons": reasons}
    return Inspection(result, images)


Batches = Callable[[], Iterator[tuple[dict[str, torch.Tensor], Optional[list[list[str]]]]]]


def _causal_lm(adapter: Adapter, result: dict[str, Any], collector: InspectionCollector, subset: list[dict[str, torch.Tensor]],
               batches: Batches, name: str, calibration: dict[str, Any], progress: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """KVSink's profile over every sample, its predicted sinks beside PFN-5's, the per-layer KV
    scan; the recipe from them. Adds its findings to `result`."""
    profile = profile_sinks(adapter, (inputs for inputs, _ in batches()), SinkProfiling(), progress)
    result["massive"] = {"source": "kvsink profile", "emergence_block": profile.emergence_layer,
                         "ratio_of": "the channel's peak |h| over the median token RMS",
                         "channels": [{"channel": c, "ratio": r} for c, r in zip(profile.channels, profile.ratios)]}
    scores = [_sink_scores(adapter, profile, batch) for batch in subset]
    result["kvsink"] = {"profile": profile.model_dump(), **_predicted_sinks(adapter, profile, collector, scores)}
    positions = [score.topk(min(recommend.MIN_SINKS, score.shape[-1]), dim=-1).indices for score in scores]
    kv_base = KVCacheScheme.model_validate(recommend.BASE_KV)
    result["kv_sensitivity"] = scan_kv(adapter, kv_base, subset, positions, recommend.MIN_SINKS, progress)
    most = max(int((score >= recommend.SINK_SHARE * profile.peak).sum(dim=-1).max()) for score in scores)
    return recommend.llm_recipe(name, calibration, profile, most, result["kv_sensitivity"])


def _encoder(adapter: Adapter, result: dict[str, Any], scan: LinearScan, ratios: dict[str, float], batches: Batches, name: str,
             calibration: dict[str, Any], progress: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A vision encoder: RegCache's l_q from the A8 scan by RegCache's rule; a text encoder:
    sink-tokens' profile. The Linears to ignore either way; the recipe. Adds to `result`."""
    result["massive"] = _massive(result["blocks"])
    if isinstance(adapter, EditableEncoder):
        a8 = {linear: value for linear, value in scan.scores["A8"].items() if linear != ALL}
        sensitivity = Sensitivity(a8, scan.blocks, {linear: ratios[linear] for linear in a8}, scan.samples, 0.0).explain()
        result["sensitive_layer"] = sensitivity
        ignored, why = recommend.ignored_linears(scan.scores, ratios, set())
        massive_at_lq = result["blocks"][sensitivity["block"]]["massive_tokens"]
        recipe, reasons = recommend.vision_recipe(name, calibration, sensitivity, massive_at_lq, ignored)
    else:
        outliers, none_found = _text_outliers(adapter, batches, progress)
        result["sink_tokens"] = outliers
        if outliers is not None and result["massive"]["emergence_block"] is None:
            result["massive"] = _text_massive(outliers, scan.blocks)
        ignored, why = recommend.ignored_linears(scan.scores, ratios, set(outliers["protected"]) if outliers else set())
        recipe, reasons = recommend.text_encoder_recipe(name, calibration, outliers, ignored, none_found)
    return recipe, [*reasons, {"choice": f"quantization.ignore: {recipe['quantization']['ignore']}", "reason": why}]


def output_name(spec: str) -> str:
    """The default output folder name for `quantsink inspect MODEL`."""
    return f"inspect-{_slug(spec)}"


def _slug(spec: str) -> str:
    tail = Path(spec.split(":")[-1]).name or spec
    return "".join(c if c.isalnum() or c in "-." else "-" for c in tail.lower()).strip("-") or "model"


def _massive(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """RegCache's criterion: the first block with a token above MASSIVE_RATIO x the median token
    l_inf; its channels within WEAK_CUTOFF of the strongest are the massive ones."""
    emergence = next((index for index, block in enumerate(blocks) if block["max_over_median"] >= MASSIVE_RATIO), None)
    if emergence is None:
        return {"source": f"no block has a token above {MASSIVE_RATIO:g}x the median token", "emergence_block": None,
                "ratio_of": "", "channels": []}
    top = blocks[emergence]["top_channels"]
    channels = [entry for entry in top if entry["absmax"] >= WEAK_CUTOFF * top[0]["absmax"]]
    return {"source": f"first block with a token above {MASSIVE_RATIO:g}x the median token l_inf", "emergence_block": emergence,
            "ratio_of": "the channel's absmax over the median token RMS",
            "channels": [{"channel": entry["channel"], "ratio": entry["over_token_rms"]} for entry in channels]}


def _text_massive(outliers: dict[str, Any], blocks: dict[str, int]) -> dict[str, Any]:
    """A text encoder's outlier tokens stay under RegCache's 10x in the residual stream; where
    sink-tokens finds them emerge (a Linear's input) and the channel that predicts them."""
    emergence = next(layer for layer in outliers["layers"] if layer["linear"] == outliers["emergence"])
    return {"source": f"sink-tokens profile: outlier tokens at the input of {outliers['emergence']}",
            "emergence_block": blocks[outliers["emergence"]],
            "ratio_of": "the outlier tokens' largest |x| over the median token's, at that input",
            "channels": [{"channel": outliers["channel"], "ratio": emergence["max_over_median"]}]}


def _shown(adapter: Adapter, collector: InspectionCollector) -> list[dict[str, Any]]:
    """Per shown sample: its tokens' l_inf per block, attention received per block, token texts
    and patch grid, and its massive tokens at each block (RegCache's criterion)."""
    grids = _patch_grids(adapter, collector.shown_inputs)
    shown = []
    for sample in range(len(collector.shown_inputs)):
        linf = [stream.shown[sample].tolist() for stream in collector.blocks]
        shown.append({
            "sample": sample,
            "tokens": collector.shown_texts[sample],
            "grid": grids[sample] if grids is not None else None,
            "token_linf": linf,
            "attention_received": [stream.received[sample].tolist() for stream in collector.blocks],
            "massive_tokens": [
                [token for token, value in enumerate(row) if value > MASSIVE_RATIO * stream.median_token_linf()]
                for row, stream in zip(linf, collector.blocks)
            ],
        })
    return shown


def _patch_grids(adapter: Adapter, inputs: list[dict[str, torch.Tensor]]) -> Optional[list[list[int]]]:
    if not isinstance(adapter, PatchGrids) or not inputs:
        return None
    grids: list[list[int]] = []

    def record(seen: list[tuple[int, int]]) -> None:
        grids.extend([list(grid) for grid in seen])

    handles = adapter.watch_patch_grids(record)
    try:
        with torch.no_grad():
            for row in inputs:
                adapter.embed(row)
    finally:
        for handle in handles:
            handle.remove()
    if len(grids) != len(inputs):
        raise UserError(f"{adapter.source.spec}: the patch-grid hook saw {len(grids)} grids for {len(inputs)} images; report it")
    return grids


def _shown_images(adapter: Adapter, collector: InspectionCollector, raw: list[Any]) -> list[np.ndarray]:
    """Each shown image as the model saw it: its (3, H, W) input rescaled to 0-255, or, for a
    family whose input is not an image tensor (patches already cut), the raw image."""
    images = []
    for row, sample in zip(collector.shown_inputs, raw):
        pixels = next((value[0] for value in row.values() if value.dim() == 4 and value.shape[1] == 3), None)
        if pixels is None:
            images.append(np.asarray(sample.convert("RGB")))
            continue
        low, high = pixels.amin(), pixels.amax()
        scaled = ((pixels - low) / (high - low).clamp_min(1e-12) * 255).round().byte()
        images.append(scaled.permute(1, 2, 0).numpy())
    return images


@torch.no_grad()
def _sink_scores(adapter: Adapter, profile: SinkProfile, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, tokens): |h[l_E]| in the profile's strongest channel (KVSink's score), padding -inf."""
    captured: list[torch.Tensor] = []
    handle = adapter.blocks()[profile.emergence_layer].register_forward_hook(
        lambda _m, _a, output: captured.append(hidden_states_of(output)[..., profile.channel].abs().float()))
    try:
        adapter.embed(inputs)
    finally:
        handle.remove()
    if not captured:
        raise UserError(f"decoder block {profile.emergence_layer} did not run in the sink-score pass of {adapter.source.spec}; report it")
    return captured[0].masked_fill(~inputs["attention_mask"].bool(), float("-inf"))


def _predicted_sinks(adapter: Adapter, profile: SinkProfile, collector: InspectionCollector,
                     scores: list[torch.Tensor]) -> dict[str, Any]:
    """For each shown sequence: KVSink-5's top 5 by score and PFN-5's first 5 real tokens, with
    their text; and how often the predicted ones are among the first 5 over the scanned samples."""
    per_sample = []
    for sample, inputs in enumerate(collector.shown_inputs):
        score = _sink_scores(adapter, profile, inputs)[0]
        real = inputs["attention_mask"][0].bool()
        score = score[real] / profile.scale
        texts = collector.shown_texts[sample] or [str(i) for i in range(len(score))]
        top = score.topk(min(PFN, len(score))).indices.tolist()
        per_sample.append({
            "sample": sample,
            "score_over_token_rms": score.tolist(),
            "kvsink": [{"position": p, "token": texts[p], "score": float(score[p])} for p in top],
            "pfn": [{"position": p, "token": texts[p], "score": float(score[p])} for p in range(min(PFN, len(score)))],
        })
    beyond = [int((score.topk(min(PFN, score.shape[-1]), dim=-1).indices - _first_real(score)[:, None] >= PFN).sum())
              for score in scores]
    return {"sample_sinks": per_sample, "predicted_beyond_pfn": sum(beyond),
            "predicted_total": sum(min(PFN, score.shape[-1]) * score.shape[0] for score in scores)}


def _first_real(score: torch.Tensor) -> torch.Tensor:
    return (~torch.isneginf(score)).long().argmax(dim=-1)


def _text_outliers(adapter: Adapter, batches: Batches, progress: bool) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """sink-tokens' profile of the text encoder, or None and the reason it found none."""
    try:
        profile = profile_outliers(adapter, target_linears(adapter.model, QuantizationConfig()), (inputs for inputs, _ in batches()),
                                   SinkTokensOptions(), progress)
    except UserError as error:  # its verdict: no outlier token (or none a channel predicts)
        return None, str(error)
    return profile.model_dump(), None
