"""The figures of `quantsink inspect` and of the quantize report, drawn with matplotlib's Agg
canvas (headless, no pyplot state) from plain lists and dicts, so that the same function draws
what an inspection measured and what a quantize report holds. Each figure has a fixed size in
pixels (SIZES at DPI): `savefig` is called without a tight bounding box."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 100
SIZES = {  # inches at DPI: the PNG is exactly width * DPI x height * DPI pixels
    "residual_tokens": (12.0, 5.0),
    "residual_patches": (12.0, 8.0),
    "channels": (12.0, 4.5),
    "attention": (12.0, 5.0),
    "sensitivity": (12.0, 5.0),
    "kvsink": (12.0, 4.5),
}
MAX_TOKENS = 64  # tokens a layer x token heatmap labels with their text
MAX_VISION_TOKENS = 1024  # tokens of an image's sequence a heatmap shows
PATCH_BLOCKS = 6  # blocks a row of patch overlays shows
SINK_COLOR, PFN_COLOR = "#d62728", "#1f77b4"


def pixel_size(kind: str) -> tuple[int, int]:
    width, height = SIZES[kind]
    return round(width * DPI), round(height * DPI)


def _figure(kind: str) -> Figure:
    figure = Figure(figsize=SIZES[kind], dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _positive(values: np.ndarray) -> np.ndarray:
    return np.maximum(values, max(float(values[values > 0].min()) if (values > 0).any() else 1e-6, 1e-12))


def token_heatmap(axes, rows: Sequence[Sequence[float]], labels: Optional[Sequence[str]], title: str, unit: str,
                  marked_block: Optional[int] = None) -> None:
    """Blocks (rows) x tokens (columns, the first MAX_TOKENS) of `rows`, on a log colour scale."""
    length = min(len(row) for row in rows)
    length = min(MAX_TOKENS, length) if labels is not None else min(MAX_VISION_TOKENS, length)
    values = _positive(np.array([row[:length] for row in rows], dtype=float))
    image = axes.imshow(values, aspect="auto", cmap="magma", norm=LogNorm(vmin=values.min(), vmax=values.max()),
                        interpolation="nearest")
    axes.figure.colorbar(image, ax=axes, label=unit, fraction=0.03, pad=0.01)
    axes.set_ylabel("block")
    axes.set_title(title, fontsize=10)
    if labels is not None:
        axes.set_xticks(range(length), [label.replace("\n", "\\n")[:8] for label in labels[:length]], rotation=90, fontsize=6)
    else:
        axes.set_xlabel("token")
    if marked_block is not None:
        axes.axhline(marked_block, color="cyan", linewidth=0.8, linestyle="--")


def residual_tokens(path: Path, rows: Sequence[Sequence[float]], labels: Optional[Sequence[str]],
                    emergence: Optional[int], what: str) -> Path:
    figure = _figure("residual_tokens")
    figure.subplots_adjust(bottom=0.2)
    token_heatmap(figure.add_subplot(), rows, labels, f"residual stream l_inf norm per token and block ({what})",
                  "l_inf", emergence)
    return _save(figure, path)


def residual_patches(path: Path, images: Sequence[np.ndarray], grids: Sequence[Sequence[int]],
                     rows_per_sample: Sequence[Sequence[Sequence[float]]], prefix: int, emergence: Optional[int],
                     massive: Sequence[Sequence[Sequence[int]]]) -> Path:
    """Per shown image (rows) and for PATCH_BLOCKS blocks (columns, the emergence block among
    them): the image with each patch's l_inf norm laid over it (log scale, shared per column);
    massive patches outlined."""
    figure = _figure("residual_patches")
    blocks = len(rows_per_sample[0])
    spaced = min(blocks, PATCH_BLOCKS - (emergence is not None))  # evenly spaced blocks, and the emergence block
    chosen = sorted(set(np.linspace(0, blocks - 1, spaced).round().astype(int).tolist()) | ({emergence} - {None}))
    axes = figure.subplots(len(images), len(chosen), squeeze=False)
    for column, block in enumerate(chosen):
        patches = [np.array(sample[block][prefix:prefix + grid[0] * grid[1]], dtype=float)
                   for sample, grid in zip(rows_per_sample, grids)]
        flat = _positive(np.concatenate(patches))
        norm = LogNorm(vmin=flat.min(), vmax=flat.max())
        for row, (image, grid, values) in enumerate(zip(images, grids, patches)):
            ax = axes[row][column]
            rows, columns = grid
            ax.imshow(image, extent=(0, columns, rows, 0), interpolation="bilinear")
            heat = _positive(values).reshape(rows, columns)
            ax.imshow(heat, extent=(0, columns, rows, 0), cmap="magma", norm=norm, alpha=0.6, interpolation="nearest")
            for token in massive[row][block]:
                patch = token - prefix
                if 0 <= patch < rows * columns:
                    ax.add_patch(Rectangle((patch % columns, patch // columns), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"block {block}" + (" (emergence)" if block == emergence else ""), fontsize=9)
    figure.suptitle("patch l_inf norm over the image (log colour per column; outlined: > 10x the median token)", fontsize=10)
    return _save(figure, path)


def channels(path: Path, blocks: Sequence[dict[str, Any]], emergence: Optional[int], massive_ratio: float) -> Path:
    """Left: per block, the largest token l_inf over the median token's. Right: per block, the
    absmax of its top channels, the two largest labelled by channel index."""
    figure = _figure("channels")
    left, right = figure.subplots(1, 2)
    ratios = [block["max_over_median"] for block in blocks]
    left.semilogy(range(len(ratios)), ratios, marker="o", color=SINK_COLOR)
    left.axhline(massive_ratio, color="gray", linestyle=":", label=f"massive ({massive_ratio:g}x)")
    left.set_xlabel("block")
    left.set_ylabel("max / median token l_inf")
    left.set_title("massive-activation signature", fontsize=10)
    left.legend(fontsize=8)
    for index, block in enumerate(blocks):
        values = [entry["absmax"] for entry in block["top_channels"]]
        right.scatter([index] * len(values), values, s=12, color="gray")
        top = block["top_channels"][:2]
        right.annotate(", ".join(str(entry["channel"]) for entry in top), (index, top[0]["absmax"]), fontsize=7,
                       xytext=(3, 2), textcoords="offset points")
    right.set_yscale("log")
    right.set_xlabel("block")
    right.set_ylabel("channel absmax")
    right.set_title("top channels per block (labels: channel index)", fontsize=10)
    for ax in (left, right):
        if emergence is not None:
            ax.axvline(emergence, color="cyan", linestyle="--", linewidth=0.8)
    figure.subplots_adjust(wspace=0.25)
    return _save(figure, path)


def attention(path: Path, received: Sequence[Sequence[float]], labels: Optional[Sequence[str]],
              largest_share: Sequence[Optional[float]], emergence: Optional[int]) -> Path:
    """Left: attention each token receives per block (one sample). Right: per block, the share of
    attention the most-attended token receives, mean over the samples."""
    figure = _figure("attention")
    grid = figure.add_gridspec(1, 3)
    token_heatmap(figure.add_subplot(grid[0, :2]), received, labels, "attention received per token (sample 0; sink score)",
                  "share", emergence)
    ax = figure.add_subplot(grid[0, 2])
    ax.plot(range(len(largest_share)), [math.nan if share is None else share for share in largest_share], marker="o")
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("share of the most-attended token")
    ax.set_title("largest attention share per block", fontsize=10)
    figure.subplots_adjust(wspace=0.6, bottom=0.2)
    return _save(figure, path)


def sensitivity(path: Path, scores: dict[str, dict[str, float]], highlighted: Optional[str],
                kv_per_layer: Optional[dict[str, Sequence[float]]] = None) -> Path:
    """Bars of each Linear's damage alone under each configuration (log scale), the sensitive
    Linear in red; beside them, for a causal LM, each KV layer's KL alone per bit width."""
    figure = _figure("sensitivity")
    grid = figure.add_gridspec(1, 3)
    ax = figure.add_subplot(grid[0, :2] if kv_per_layer else grid[0, :])
    names = [name for name in next(iter(scores.values())) if name != "all"]
    width = 0.8 / len(scores)
    for index, (label, values) in enumerate(scores.items()):
        heights = _positive(np.array([values[name] for name in names], dtype=float))
        colors = [SINK_COLOR if name == highlighted else None for name in names]
        bars = ax.bar(np.arange(len(names)) + index * width, heights, width, label=label)
        for bar, color in zip(bars, colors):
            if color is not None:
                bar.set_edgecolor(color)
                bar.set_linewidth(2)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [_short(name) for name in names], rotation=90,
                  fontsize=max(4, min(7, 400 // max(len(names), 1))))
    ax.set_ylabel("damage alone (1 - centred cosine)")
    ax.set_title("per-layer quantization sensitivity" + (f" (outlined: {highlighted})" if highlighted else ""), fontsize=10)
    ax.legend(fontsize=8)
    if kv_per_layer:
        kv = figure.add_subplot(grid[0, 2])
        layers = len(next(iter(kv_per_layer.values())))
        width = 0.8 / len(kv_per_layer)
        for index, (bits, values) in enumerate(kv_per_layer.items()):
            kv.bar(np.arange(layers) + index * width, _positive(np.array(values, dtype=float)), width, label=f"{bits}-bit")
        kv.set_yscale("log")
        kv.set_xlabel("decoder layer (only its KV quantized)")
        kv.set_ylabel("KL per token")
        kv.set_title("per-layer KV sensitivity", fontsize=10)
        kv.legend(fontsize=8)
    figure.subplots_adjust(bottom=0.3, wspace=0.35)
    return _save(figure, path)


def kvsink(path: Path, layer_ratios: Sequence[float], emergence: int, scores: Optional[Sequence[float]],
           labels: Optional[Sequence[str]], predicted: Sequence[int], pfn: Sequence[int]) -> Path:
    """Left: per block, the largest channel peak over the typical token RMS (KVSink's profile).
    Right (when a sample is given): each token's score at l_E, predicted sinks in red, PFN's
    first tokens outlined in blue."""
    figure = _figure("kvsink")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": (1, 2)})
    left.semilogy(range(len(layer_ratios)), layer_ratios, marker="o", color=SINK_COLOR)
    left.axvline(emergence, color="cyan", linestyle="--", linewidth=0.8)
    left.set_xlabel("block")
    left.set_ylabel("peak channel / token RMS")
    left.set_title(f"KVSink profile (emergence: block {emergence})", fontsize=10)
    if scores is not None:
        length = min(MAX_TOKENS, len(scores))
        heights = _positive(np.array(scores[:length], dtype=float))
        colors = [SINK_COLOR if position in predicted else "gray" for position in range(length)]
        bars = right.bar(range(length), heights, color=colors)
        for position in pfn:
            if position < length:
                bars[position].set_edgecolor(PFN_COLOR)
                bars[position].set_linewidth(2)
        right.set_yscale("log")
        if labels is not None:
            right.set_xticks(range(length), [label.replace("\n", "\\n")[:8] for label in labels[:length]], rotation=90, fontsize=6)
        right.set_ylabel("score / token RMS at l_E")
        right.set_title("predicted sinks (red) vs PFN-5 (blue outline), sample 0", fontsize=10)
    else:
        right.axis("off")
    figure.subplots_adjust(bottom=0.25, wspace=0.25)
    return _save(figure, path)


def _short(name: str) -> str:
    parts = name.split(".")
    numbered = next((index for index, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[numbered:]) if numbered is not None else name
