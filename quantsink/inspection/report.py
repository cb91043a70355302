"""What an inspection writes (inspect.json, the PNG figures, inspect.md, a self-contained
inspect.html with the figures embedded, recommended.yaml) and the report.md with figures that
`quantsink quantize` writes beside report.json from what its report already holds.

A page is a list of parts (heading, paragraph, table, figure) rendered once as Markdown and once
as HTML, so that the two always show the same figures and numbers."""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from quantsink import io
from quantsink.inspection import figures, recommend
from quantsink.methods.regcache.profile import MASSIVE_RATIO

if TYPE_CHECKING:
    from quantsink.inspection.run import Inspection


@dataclass
class Part:
    kind: str  # "heading", "text", "table", "figure"
    text: str = ""
    rows: Sequence[Sequence[str]] = ()  # a table's rows, the first its header
    file: str = ""  # a figure's PNG, beside the page


def markdown(parts: list[Part]) -> str:
    lines: list[str] = []
    for part in parts:
        if part.kind == "heading":
            lines += [f"## {part.text}", ""]
        elif part.kind == "text":
            lines += [part.text, ""]
        elif part.kind == "table":
            header, *body = part.rows
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body] + [""]
        else:
            lines += [f"![{part.text}]({part.file})", "", f"*{part.text}*", ""]
    return "\n".join(lines)


def page_html(title: str, parts: list[Part], folder: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for part in parts:
        if part.kind == "heading":
            body.append(f"<h2>{html.escape(part.text)}</h2>")
        elif part.kind == "text":
            body.append(f"<p>{html.escape(part.text)}</p>")
        elif part.kind == "table":
            header, *rows = part.rows
            cells = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
            body.append(f"<table><tr>{cells}</tr>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows) + "</table>")
        else:
            encoded = base64.b64encode((folder / part.file).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(part.text)}" data-file="{html.escape(part.file)}" '
                        f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(part.text)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1240px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _blocks_table(blocks: list[dict[str, Any]]) -> Part:
    rows = [("block", "max / median token l_inf", "massive tokens", "top channels (absmax)", "largest attention share")]
    for index, block in enumerate(blocks):
        share = block.get("largest_attention_share")
        rows.append((str(index), f"{block['max_over_median']:.1f}", str(block.get("massive_tokens", "")),
                     ", ".join(f"{entry['channel']} ({entry['absmax']:.3g})" for entry in block["top_channels"][:3]),
                     "" if share is None else f"{share:.2f}"))
    return Part("table", rows=rows)


# --- inspect --------------------------------------------------------------------------------
def save_inspection(inspection: "Inspection", destination: Path) -> Path:
    data = inspection.data
    with io.atomic_output_dir(destination) as staging:
        parts = draw(inspection, staging)
        data = {**data, "figures": [{"file": part.file, "caption": part.text, "pixels": list(figures.pixel_size(part.file[:-4]))}
                                   for part in parts if part.kind == "figure"]}
        recipe, reasons = data["recommended"]["recipe"], data["recommended"]["reasons"]
        (staging / "recommended.yaml").write_text(recommend.to_yaml(recipe, reasons, data["model"]))
        io.write_json(staging / "inspect.json", data)
        parts += [Part("heading", "Recommended recipe (recommended.yaml)"),
                  Part("table", rows=[("choice", "measured reason")] + [(entry["choice"], entry["reason"]) for entry in reasons])]
        title = f"quantsink inspect {data['model']} ({data['family']})"
        intro = Part("text", f"{data['calibration']['data']}; {data['calibration']['samples']} samples.")
        (staging / "inspect.md").write_text(f"# {title}\n\n" + markdown([intro, *parts]))
        (staging / "inspect.html").write_text(page_html(title, [intro, *parts], staging))
    return destination


def draw(inspection: "Inspection", folder: Path) -> list[Part]:
    """Every figure of the inspection into `folder`, each with the parts that introduce it."""
    data = inspection.data
    blocks, shown, massive = data["blocks"], data["shown"], data["massive"]
    emergence = massive["emergence_block"]
    first = shown[0]
    parts: list[Part] = [Part("heading", "Where the massive activations are")]
    channels = ", ".join(f"{entry['channel']} ({entry['ratio']:.1f}x)" for entry in massive["channels"])
    parts.append(Part("text", f"Emergence block: {emergence} ({massive['source']}); channels: {channels or 'none'}"
                              + (f" ({massive['ratio_of']})." if channels else ".")))
    figures.residual_tokens(folder / "residual_tokens.png", first["token_linf"], first["tokens"], emergence,
                            "sample 0, with its token text" if first["tokens"] else "sample 0, tokens in sequence order")
    parts.append(Part("figure", "layer x token residual l_inf norms (sample 0)", file="residual_tokens.png"))
    if data["modality"] == "image" and first["grid"] is not None:
        figures.residual_patches(folder / "residual_patches.png", inspection.images, [sample["grid"] for sample in shown],
                                 [sample["token_linf"] for sample in shown], data["num_prefix_tokens"], emergence,
                                 [sample["massive_tokens"] for sample in shown])
        parts.append(Part("figure", "patch l_inf norms laid over the sample images", file="residual_patches.png"))
    figures.channels(folder / "channels.png", blocks, emergence, MASSIVE_RATIO)
    parts += [Part("figure", "max/median signature and top channels per block", file="channels.png"), _blocks_table(blocks)]
    parts.append(Part("heading", "Attention sinks"))
    figures.attention(folder / "attention.png", first["attention_received"], first["tokens"],
                      [block["largest_attention_share"] for block in blocks], emergence)
    parts.append(Part("figure", "attention received per token and block (sink score)", file="attention.png"))
    sensitivity = data["sensitivity"]
    lq = data.get("sensitive_layer")
    kv = data.get("kv_sensitivity")
    parts.append(Part("heading", "Quantization sensitivity, one layer at a time"))
    text = f"{sensitivity['criterion']}, {sensitivity['samples']} samples; whole model: " + ", ".join(
        f"{label} {scores['all']:.2e}" for label, scores in sensitivity["scores"].items())
    if lq is not None:
        text += f". RegCache's l_q: block {lq['block']} ({lq['linear']})."
    parts.append(Part("text", text))
    figures.sensitivity(folder / "sensitivity.png", sensitivity["scores"], lq["linear"] if lq else None,
                        kv["per_layer_kl"] if kv else None)
    parts.append(Part("figure", "per-layer quantization sensitivity" + (" and per-layer KV sensitivity" if kv else ""),
                      file="sensitivity.png"))
    if kv:
        parts.append(Part("text", f"KL per token with every layer's KV quantized (recommended.yaml's scheme at 4 and 2 bits, "
                                  f"chunks of {kv['chunk_size']}, {kv['samples']} sequences), keeping no sink, the first 5 "
                                  "tokens, or the predicted ones:"))
        parts.append(Part("table", rows=[("bits", *kv["all_layers_kl"][next(iter(kv["all_layers_kl"]))])] + [
            (bits, *(f"{value:.4f}" for value in row.values())) for bits, row in kv["all_layers_kl"].items()]))
    if "kvsink" in data:
        parts += _kvsink_parts(data, folder)
    if data.get("sink_tokens"):
        outliers = data["sink_tokens"]
        parts.append(Part("heading", "Outlier tokens (sink-tokens profile)"))
        parts.append(Part("table", rows=[("linear", "max / median", "outlier tokens", "top tokens")] + [
            (layer["linear"], f"{layer['max_over_median']:.1f}", str(layer["outliers"]), json.dumps(layer["top_tokens"]))
            for layer in outliers["layers"] if layer["outliers"]]))
    return parts


def _kvsink_parts(data: dict[str, Any], folder: Path) -> list[Part]:
    kvsink = data["kvsink"]
    profile = kvsink["profile"]
    sample = kvsink["sample_sinks"][0]
    figures.kvsink(folder / "kvsink.png", profile["layer_ratios"], profile["emergence_layer"], sample["score_over_token_rms"],
                   data["shown"][0]["tokens"], [entry["position"] for entry in sample["kvsink"]],
                   [entry["position"] for entry in sample["pfn"]])
    rows = [("sample", "KVSink-5 predicted sinks (position: token)", "PFN-5 keeps")]
    for entry in kvsink["sample_sinks"]:
        rows.append((str(entry["sample"]), ", ".join(f"{s['position']}: {s['token']!r}" for s in entry["kvsink"]),
                     ", ".join(f"{s['position']}: {s['token']!r}" for s in entry["pfn"])))
    channels = ", ".join(f"{c} ({r:.1f}x)" for c, r in zip(profile["channels"], profile["ratios"]))
    return [Part("heading", "KVSink profile and predicted sinks"),
            Part("text", f"Emergence layer {profile['emergence_layer']}; stable outlier channels {channels} a typical token's RMS; "
                         f"{kvsink['predicted_beyond_pfn']} of {kvsink['predicted_total']} predicted sinks lie beyond the first "
                         "5 tokens PFN-5 keeps."),
            Part("figure", "KVSink profile per block and the predicted sinks of sample 0", file="kvsink.png"),
            Part("table", rows=rows)]


# --- quantize ---------------------------------------------------------------------------------
def write_quantize_report(report: dict[str, Any], folder: Path) -> list[str]:
    """report.md and its figures, from what `report` (report.json) holds: the calibration pass's
    outliers per block, RegCache's sensitivity scan, KVSink's profile. Nothing is measured again;
    per-token figures need per-token data, which `quantsink inspect` gathers. The figure files."""
    parts: list[Part] = []
    written: list[str] = []
    if "fidelity" in report:
        fidelity = report["fidelity"]
        parts.append(Part("text", f"Fidelity on {fidelity['samples']} holdout samples: cosine {fidelity['cosine_mean']:.4f}, centred "
                                  f"cosine {fidelity['centered_cosine_mean']:.4f}, relative L2 {fidelity['relative_l2']:.4f}."))
    if "kv_cache" in report:
        kv = report["kv_cache"]
        parts.append(Part("text", f"KV cache {kv['scheme']}: perplexity {kv['perplexity_reference']:.3f} -> "
                                  f"{kv['perplexity_quantized']:.3f}, KL {kv['kl_mean']:.5f} per token."))
    outliers = report.get("outliers")
    if outliers:
        emergence = next((index for index, block in enumerate(outliers) if block["max_over_median"] >= MASSIVE_RATIO), None)
        figures.channels(folder / "channels.png", outliers, emergence, MASSIVE_RATIO)
        parts += [Part("heading", "Where the massive activations are (calibration pass, the recipe's methods installed)"),
                  Part("figure", "max/median signature and top channels per block", file="channels.png"), _blocks_table(outliers)]
    regcache = report.get("methods", {}).get("regcache")
    if regcache and regcache.get("sensitivity"):
        scan = regcache["sensitivity"]
        figures.sensitivity(folder / "sensitivity.png", {"A8": scan["scores"]}, scan["linear"])
        parts += [Part("heading", "RegCache's sensitivity scan"),
                  Part("text", f"l_q: block {scan['block']} ({scan['linear']}); variant {regcache['variant']}, prefix from block "
                               f"{regcache['prefix_start']}, tau {regcache['num_registers']}, delete {regcache['delete_tokens']}."),
                  Part("figure", "each Linear's damage with its input quantized alone", file="sensitivity.png")]
    kvsink = report.get("methods", {}).get("kvsink")
    if kvsink:
        figures.kvsink(folder / "kvsink.png", kvsink["layer_ratios"], kvsink["emergence_layer"], None, None, [], [])
        channels = ", ".join(f"{c} ({r:.1f}x)" for c, r in zip(kvsink["channels"], kvsink.get("ratios", [])))
        parts += [Part("heading", "KVSink profile"),
                  Part("text", f"Emergence layer {kvsink['emergence_layer']}; channels {channels or kvsink['channels']}."),
                  Part("figure", "largest channel peak over the typical token RMS per block", file="kvsink.png")]
    written = [part.file for part in parts if part.kind == "figure"]
    note = Part("text", "Per-token heatmaps, attention sinks and per-layer sensitivity at W8A8/W4A8: `quantsink inspect`.")
    title = f"quantsink quantize {report['model']} ({report['family']}), recipe {report['recipe']}"
    (folder / "report.md").write_text(f"# {title}\n\n" + markdown([*parts, note]))
    return written
