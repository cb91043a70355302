"""A small CLIP vision encoder whose sink tokens form through attention, so that a register
prefix prevents them, as RegCache (arXiv 2510.04547) and "Vision Transformers Need Registers"
describe: a model that needs somewhere to park attention recruits background patches and
grows them massive, unless a sink-like key is already there.

`quantsink.testing.planted_clip` stays the case where only deletion can help (its sinks are
fixed in block 0 and MLPs amplify them whatever attention sees). Here the same base model (its
`_set_base_weights`, reserved-direction frame and clipped ramps, imported) carries a plant in
which the prefix does the work, deletion alone lets sinks re-form, and only the pair removes
both, as in the paper's ablation where either part alone can lose to naive.

    from quantsink.testing.planted_clip_emergent import build_emergent_clip, emergent_sinks
    model = build_emergent_clip(seed=0)      # plant=False: the same base weights, no plant
    plan = emergent_sinks(model)             # blocks and channels, stored in config.emergent_sinks
    # inputs: quantsink.testing.planted_clip.planted_clip_inputs(n, seed)

Default size as planted_clip (hidden 128, 8 blocks of 4 heads, MLP 512, 64x64 images in 8x8
patches, eager attention). Emergence block l_q = E = 4. Numbers are measured with seed 0 on
`planted_clip_inputs(96, seed=0)` unless they say "holdout": the recipe
recipes/planted-clip-emergent-w8a8-regcache.yaml's bundled split (64 calibration crops, 32
holdout crops of other photographs). LN units are what a LayerNorm output holds; a pure sink
reads LN(x)[P] - LN(x)[N] = 16 ("sinkness").

* Reserved directions: massive channels P, N and a third one Q (one-hot, seeded), and dense
  s, t (flatness and spatial preference, as in planted_clip), r, r' (best flatness at the
  selection and re-selection), c (CLS only), and per gate block a "parked" and an "opened"
  direction. Ordinary weights neither read nor write them.
* Candidates, block 0 (planted_clip's selection, window 8%): the flattest patches of each
  image get a mark of +-12 in P/N ("marks per image" 1-10: 28, 30, 19, 9, 5, 2, 0, 0, 1, 2 of
  96), leaning toward +Q or -Q by their content (units 2, 3: the difference of two GELUs of the
  selection read shifted by +-content, a product that is 0 off the selection). A mark is
  at most 5.3x the median token l_inf: visible, not massive. No prefix reaches block 0 (the paper's
  start range is l_q-3..l_q = 1..4), so the marks are the sink mass only deletion removes.
* Gate, block E-1 = 3, head 3: a marked query parks on sink-like keys (logit +1 per marked key;
  ordinary queries attend evenly, CLS attends to itself), and the share it parks is written
  along `parked` (LN 0.1-1.1 for marked tokens in images with up to 6 marks). Its MLP (units 0, 1) writes the "opened"
  marker where a token is marked (sinkness above 11.5) and parks less than 1.15 LN: a few
  marks leave the gate open; tau register copies (log(tau) logit weight) from tau = 8 push
  the share to 1.2-2.2 LN (tau 15: 1.7-2.7; holdout, block 3) and shut it, while without them it
  stays at 0.15-1.5 (the top: images with 10 marks, which shut their own gate). That is the attention demand: sinks grow until they
  absorb the parking heads' attention, and a register already absorbs it.
* Emergence, block E = 4: units 2, 3 turn the opened marker into the massive write (fc2 input
  per LN unit 1500, tilted +-135 per LN unit of Q, so each sink leans its own way). The fc2
  input max per block goes 31, 5, 5, 22, **1159**, 42, 149, 5 (block 6: sinks leaning far
  along Q grow again) and the l_inf ratio to the median jumps from 3.9 to 263. Massive sinks
  (l_inf > 10x the median) per image, 0-6: 4, 28, 31, 18, 10, 4, 1 (an image with many marks
  parks enough on them to shut its own gate: no sink). Units 4, 5 grow every mark by up to 20
  whatever the gate says (fc2 input about 49): growth no prefix stops.
* Re-selection, block E (head 0 and MLP units 0, 1): a soft max of flatness plus sinkness; any
  sink-like key (a mark, a sink, a register) outranks every patch, so nothing happens unless a
  deletion at E's input has removed every mark and no prefix is there. Then the flattest
  remaining patches are marked (0-3 in most images), and block E+1 (the second gate, head 3
  and MLP) and block E+2 (units 2, 3) grow them massive: deletion alone lets sinks re-form
  two blocks later.
* Variation: the top sink token of different images has a mean pairwise cosine of 0.90
  +- 0.14 at the last block (0.92 at E's output), normal tokens 0.37 (the paper: 0.89 +- 0.07
  against 0.26). Sinks sit on flat patches (pixel variance 0.06 of the image mean, 25 positions).
* Parking, blocks 5-7: dim 0 of heads 0-2 as in planted_clip (advantage 10), 98-99% of their
  attention on the sinks, whose values are near zero, so a register stands in for them.

Consequence at W8A8 (fake backend, per-channel symmetric 8-bit weights, per-tensor static
symmetric min-max activations on every Linear), holdout centred cosine / cosine to full
precision, l_q's fc2 input max, RegCache installed with registers built as RegCache builds them
(candidates: top 50 by l_inf at blocks 1-4 of the calibration images, averaged K/V from block 1):
naive 0.920 / 0.973, 1202; prefix-only (start 1, tau 8) 0.934 / 0.978, 49; delete-only (k~ 1)
0.853 / 0.943, 1085; both (start 3, tau 4, k~ 8) **0.986** / 0.995, 28. Over the grid start
1-4, tau 1-15, k~ 1-10 (each part tuned on its own) the best are prefix-only 0.939 (start 4,
tau 4: no prevention; the best preventing one is start 1, tau 8), delete-only 0.853, both
0.986. The same settings without quantization: prefix-only 0.985, delete-only 0.935, both
0.993 (what the edits themselves change). `plant=False` at W8A8: 0.999 / 0.9996, fc2 input max
5.2. At W6A6 and W4A8 the plant's own decisions (selection window, gates) no longer survive the
activation quantizer and no variant is reliably better than naive: W6A6 naive 0.838, prefix-only
0.781, delete-only 0.786, both 0.661; W4A8 0.593, 0.540, 0.611, 0.614 (same settings).
The constants are tuned for seed 0 at the default size; other sizes are not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from quantsink.errors import UserError
from quantsink.testing.planted_clip import (
    DEFAULT_SIZE, MAX_GAIN, MAX_SCALE, SELECT_RAMP, PlantedSinks, _clipped_ramp, _Frame, _set_base_weights,
)

# --- the plant (LN units: what a LayerNorm output holds; a pure sink reads 2 sqrt(d/2) = 16) ----
SELECT_SHARPNESS = 40.0  # selection attention logit per unit of flatness score
SELECT_WINDOW = 0.08  # a patch is recruited if its flatness is within this fraction of the image's best
RESELECT_WINDOW = 0.03  # the same at the re-selection
RESELECT_NORM = 1.71  # norm / sqrt(d) of the flattest patch entering the re-selection block (measured 1.70-1.72)
SELECT_STEP = 0.05  # flatness above (1 - window) * best at which the mark is full
MARK = 12.0  # +-value a recruited patch gets in the massive channels
MARK_SINKNESS = 11.0  # LN sinkness LN(x)[P] - LN(x)[N] of a marked token around the emergence
GATE_ADVANTAGE = 1.0  # gate heads: attention logit of a marked key for a marked query
GATE_VALUE = 11.0  # gate heads: what a marked key writes per unit of attention
CLS_SELF = 15.0  # CLS's logit for itself in the gate and re-selection heads: none of them reaches CLS
CLS_READ = 4.5  # LN(x) of CLS along its own direction around the emergence
RESELECT_SINKNESS = 1.0  # re-selection score per unit of LN sinkness: any sink outranks every patch
OPEN_FROM = 11.5  # a gate block's MLP marks a token "open" if its LN sinkness is above this ...
OPEN_SLOPE = 3.0
PARKED_OPEN = 1.15  # ... and its gate signal (LN units) is below this
PARKED_SLOPE = 25.0
OPEN_CLIP, OPEN_WRITE = 2.0, 2.0  # the open marker: a clipped ramp, written along the block's `opened`
AMPLIFY_SLOPE = 1500.0  # fc2 input per LN unit of the open marker above AMPLIFY_FROM: the massive write
AMPLIFY_FROM = 0.5
AMPLIFY_GAIN = 1.0
TILT_READ, TILT_WRITE = 1.0, 5.0  # block 0: the content read and the Q written per unit of it
VARIATION = 135.0  # amplification: fc2 input per LN unit of Q, so a mark's lean grows with it
INTRINSIC = (6.0, 10.0, 20.0, 1.0)  # ungated growth at the emergence block: threshold, slope, clip, gain
PARK_ADVANTAGE = 10.0  # parking heads: attention logit of a pure sink over ordinary tokens


@dataclass(frozen=True)
class EmergentSinks(PlantedSinks):
    """What `build_emergent_clip` planted: PlantedSinks' fields (selection_block marks the
    candidates, growth_blocks amplify them when the gates are open) and the gate blocks."""

    variation_channel: int = -1  # third massive channel, which tilts each sink's direction
    gate_blocks: tuple[int, ...] = ()  # blocks whose head 3 measures attention parked on sink-like keys
    reselection_block: int = -1  # recruits new candidates when none is left (after a deletion)


def emergent_sinks(model: CLIPVisionModel) -> EmergentSinks:
    """The plan stored in the config of a model made by `build_emergent_clip`."""
    data = getattr(getattr(model, "config", None), "emergent_sinks", None)
    if data is None:
        raise UserError("this model was not built by build_emergent_clip: its config has no 'emergent_sinks'")
    return EmergentSinks.from_dict(data)


def build_emergent_clip(seed: int = 0, *, plant: bool = True) -> CLIPVisionModel:
    """A CLIPVisionModel (eval, float32, eager attention) of DEFAULT_SIZE whose sinks form
    through attention; `plant=False` gives the same base weights without the plant."""
    config = CLIPVisionConfig(**DEFAULT_SIZE, attn_implementation="eager")
    layers, dim = config.num_hidden_layers, config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    massive = torch.randperm(dim, generator=generator)[:3].tolist()
    emergence = layers // 2
    plan = EmergentSinks(
        enabled=plant,
        massive_channels=(massive[0], massive[1]),
        selection_block=0,
        emergence_block=emergence,
        growth_blocks=(emergence, emergence + 2),
        parking_blocks=tuple(range(emergence + 1, layers)),
        variation_channel=massive[2],
        gate_blocks=(emergence - 1, emergence + 1),
        reselection_block=emergence,
    )
    config.emergent_sinks = plan.to_dict()
    model = CLIPVisionModel(config).eval()
    frame = _EmergentFrame.draw(dim, plan, generator)
    with torch.no_grad():
        _set_base_weights(model, frame.base, generator)
        # CLS alone holds `cls` (in the control too: nothing ordinary reads it), so that it can
        # attend to itself where the plant's heads must not write into it.
        model.embeddings.class_embedding.add_(frame.cls * math.sqrt(dim) / 2)
        if plant:
            _plant(model, frame, plan)
    return model


@dataclass
class _EmergentFrame:
    """planted_clip's frame (P, N, s, t, r and the ordinary projector) with the extra reserved
    directions of this plant."""

    base: _Frame
    variation: torch.Tensor  # one-hot Q
    reselected_maximum: torch.Tensor  # r', the best flatness at the re-selection
    cls: torch.Tensor  # held by CLS only: lets CLS attend to itself
    parked: tuple[torch.Tensor, ...]  # per gate block: the attention a candidate parks on sink-like keys
    opened: tuple[torch.Tensor, ...]  # per gate block: its MLP's marker "candidate, and its gate is open"
    content: torch.Tensor  # an ordinary direction: the content read that tilts a sink toward +-Q

    @classmethod
    def draw(cls, dim: int, plan: EmergentSinks, generator: torch.Generator) -> "_EmergentFrame":
        eye = torch.eye(dim)
        one_hot = [eye[channel] for channel in (*plan.massive_channels, plan.variation_channel)]
        dense = 5 + 2 * len(plan.gate_blocks)
        spanning = [torch.ones(dim), *one_hot, *torch.randn(dense, dim, generator=generator)]
        basis, _ = torch.linalg.qr(torch.stack(spanning, dim=1))
        smooth, preference, maximum, reselected, cls_direction, *gates = basis[:, 4:].T
        ordinary = eye - basis @ basis.T
        content = torch.nn.functional.normalize(ordinary @ torch.randn(dim, generator=generator), dim=0)
        base = _Frame(one_hot[0], one_hot[1], smooth, preference, maximum, ordinary)
        half = len(gates) // 2
        return cls(base, one_hot[2], reselected, cls_direction, tuple(gates[:half]), tuple(gates[half:]), content)


def _plant(model: CLIPVisionModel, frame: _EmergentFrame, plan: EmergentSinks) -> None:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layers = model.encoder.layers
    base = frame.base
    massive = base.massive_difference
    saturated = 2 * math.sqrt(config.hidden_size / 2)  # LN(x)[P] - LN(x)[N] of a pure sink
    slope = SELECT_RAMP / SELECT_STEP

    # Selection, block 0: a soft max of flatness over the patches, and a ramp that marks the
    # patches within SELECT_WINDOW of it.
    _max_head(layers[plan.selection_block].self_attn, 0, head_dim, base.smoothness, base.maximum, None)
    reads = slope * (base.smoothness - (1 - SELECT_WINDOW) / MAX_GAIN * base.maximum)
    _clipped_ramp(layers[plan.selection_block].mlp, reads, 0.0, SELECT_RAMP, MARK / SELECT_RAMP * massive)
    # Units 2, 3: the same selection read shifted by +-content. Their difference is about
    # 2 * TILT_READ * content where the selection fires and 0 where it does not (a gated
    # product), written along Q: each mark leans toward +Q or -Q by its patch's content.
    mlp = layers[plan.selection_block].mlp
    for unit, sign in ((2, 1.0), (3, -1.0)):
        mlp.fc1.weight[unit] = reads + sign * TILT_READ * frame.content
        mlp.fc1.bias[unit] = 0.0
        mlp.fc2.weight[:, unit] = sign * TILT_WRITE * frame.variation

    # Gates: in head 3 of each gate block a marked query parks on sink-like keys, and the share
    # of its attention they take (times GATE_VALUE) is written along that block's `parked`.
    gate_head = config.num_attention_heads - 1
    gain = math.sqrt(GATE_ADVANTAGE * math.sqrt(head_dim)) / MARK_SINKNESS
    for block, parked in zip(plan.gate_blocks, frame.parked):
        attention = layers[block].self_attn
        rows = slice(gate_head * head_dim, (gate_head + 1) * head_dim)
        for projection in (attention.q_proj, attention.k_proj):
            projection.weight[rows] = 0
            projection.bias[rows] = 0
        attention.q_proj.weight[rows.start] = gain * massive
        attention.k_proj.weight[rows.start] = gain * massive
        attention.v_proj.weight[rows.start] = GATE_VALUE / MARK_SINKNESS * massive
        attention.out_proj.weight[:, rows.start] = parked
        _attend_to_self(attention, rows.start + 1, frame.cls, head_dim)

    # Re-selection at the emergence block (its head 0 and MLP units 0, 1): a soft max of
    # flatness plus sinkness, so any sink-like key outranks every patch and only where none is
    # left (after a deletion) the flattest patch is recruited.
    emergence = layers[plan.reselection_block]
    score = base.smoothness + RESELECT_SINKNESS * massive
    _max_head(emergence.self_attn, 0, head_dim, score, frame.reselected_maximum, frame.cls)
    # The best score comes from the keys' LayerNorm, a patch's own from the MLP's: the flattest
    # patch's norm relates the two.
    reads = slope * (base.smoothness - (1 - RESELECT_WINDOW) * RESELECT_NORM / MAX_GAIN * frame.reselected_maximum)
    _clipped_ramp(emergence.mlp, reads, 0.0, SELECT_RAMP, MARK / SELECT_RAMP * massive)

    # Each gate block's MLP (units 0, 1) marks the candidates whose gate is open; the next block
    # but one amplifies that marker to massive (units 2, 3), each sink leaning further the way
    # its mark leans along Q. Units 4, 5 of the emergence block are intrinsic growth, which no
    # gate stops.
    tilt = VARIATION * frame.variation
    for gate_block, growth_block, parked, opened in zip(plan.gate_blocks, plan.growth_blocks, frame.parked, frame.opened):
        reads = OPEN_SLOPE * massive - PARKED_SLOPE * parked
        bias = PARKED_SLOPE * PARKED_OPEN - OPEN_SLOPE * OPEN_FROM
        _clipped_ramp(layers[gate_block].mlp, reads, bias, OPEN_CLIP, OPEN_WRITE / OPEN_CLIP * opened)
        mlp = layers[growth_block].mlp
        for unit, sign in ((2, 1.0), (3, -1.0)):
            mlp.fc1.weight[unit] = AMPLIFY_SLOPE * opened + sign * tilt
            mlp.fc1.bias[unit] = -AMPLIFY_SLOPE * AMPLIFY_FROM
            mlp.fc2.weight[:, unit] = AMPLIFY_GAIN * (massive + sign * frame.variation)
    threshold, ramp_slope, clip, growth = INTRINSIC
    intrinsic = layers[plan.emergence_block].mlp
    _clipped_ramp_units(intrinsic, 4, ramp_slope * massive, -ramp_slope * threshold, clip, growth * massive)

    # Parking: dim 0 of heads 0-2 from the block after emergence on, as in planted_clip.
    park_gain = PARK_ADVANTAGE * math.sqrt(head_dim) / saturated
    for block in plan.parking_blocks:
        attention = layers[block].self_attn
        for head in range(gate_head):
            row = head * head_dim
            attention.q_proj.weight[row] = 0
            attention.q_proj.bias[row] = 1.0
            attention.k_proj.weight[row] = park_gain * massive


def _clipped_ramp_units(mlp, first: int, reads: torch.Tensor, bias: float, clip: float, writes: torch.Tensor) -> None:
    """planted_clip's `_clipped_ramp` on hidden units `first` and `first + 1` (its own takes 0, 1,
    which the emergence block's re-selection already uses)."""
    mlp.fc1.weight[first : first + 2] = reads
    mlp.fc1.bias[first] = bias
    mlp.fc1.bias[first + 1] = bias - clip
    mlp.fc2.weight[:, first] = writes
    mlp.fc2.weight[:, first + 1] = -writes


def _max_head(attention, head: int, head_dim: int, score: torch.Tensor, written: torch.Tensor, cls_direction) -> None:
    """Head `head` becomes a soft max of `score` over the tokens (dim 0), written along `written`."""
    rows = slice(head * head_dim, (head + 1) * head_dim)
    attention.q_proj.weight[rows] = 0
    attention.q_proj.bias[rows] = 0
    attention.k_proj.weight[rows] = 0
    attention.q_proj.bias[rows.start] = math.sqrt(head_dim)
    attention.k_proj.weight[rows.start] = SELECT_SHARPNESS * score
    attention.v_proj.weight[rows.start] = score / MAX_SCALE
    attention.out_proj.weight[:, rows.start] = MAX_GAIN * MAX_SCALE * written
    if cls_direction is not None:
        # Sink-like keys outrank every patch here, and whoever attends to them reads their
        # values: so this head reads nothing but the score, and CLS's query drops the constant
        # and attends to itself instead.
        attention.v_proj.weight[rows.start + 1 : rows.stop] = 0
        attention.v_proj.bias[rows] = 0
        attention.q_proj.weight[rows.start] = -math.sqrt(head_dim) / CLS_READ * cls_direction
        _attend_to_self(attention, rows.start + 1, cls_direction, head_dim)


def _attend_to_self(attention, row: int, cls_direction: torch.Tensor, head_dim: int) -> None:
    """Query and key dim `row` read the CLS-only direction, so that CLS's attention in this head
    stays on itself (logit about CLS_SELF). Only CLS's key is large there, and only a little, so
    the few thousandths that activation quantization leaves in a patch's query move nothing."""
    gain = math.sqrt(CLS_SELF * math.sqrt(head_dim)) / CLS_READ
    attention.q_proj.weight[row] = gain * cls_direction
    attention.k_proj.weight[row] = gain * cls_direction
    attention.v_proj.weight[row] = 0
