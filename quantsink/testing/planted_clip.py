"""A small CLIP vision encoder whose weights are set by hand so that it grows sink tokens.

Large vision encoders (CLIP, OpenCLIP, SigLIP, DINOv2) develop, in their middle blocks, a few
tokens on background patches with massive activations in a few fixed channels; later heads
park their attention on them, and per-tensor activation quantization then loses the ordinary
tokens' precision ("Vision Transformers Need Registers"; RegCache, arXiv 2510.04547). Real
checkpoints cannot be downloaded here, so this module builds a `transformers.CLIPVisionModel`
of the real architecture whose weights reproduce that phenomenon by construction, with every
quirk known in advance, so that tests can check detection and repair against ground truth.

    from quantsink.testing.planted_clip import build_planted_clip, planted_clip_inputs, planted_sinks
    model = build_planted_clip(seed=0)            # plant=False: the same weights, no sinks
    pixel_values = planted_clip_inputs(96, seed=0)
    plan = planted_sinks(model)                   # which blocks and channels were planted

Construction (defaults: hidden 128, 8 blocks of 4 heads, MLP 512, 64x64 images in 8x8 patches,
quick-GELU, eager attention so that `output_attentions` works). Numbers below are measured on
`planted_clip_inputs(96, seed=0)` with seed 0.

* Reserved subspace. Five directions of the residual stream belong to the plant: the massive
  channels `P` and `N` (one-hot, drawn from the seed; stored in the plan), and three dense
  zero-mean directions `s` (smooth), `t` (tie-breaker), `r` (image maximum). Every ordinary
  weight writes only into their orthogonal complement and reads only from it. So ordinary
  tokens hold exactly 0 in `P` and `N`, and what a token holds in the reserved directions is
  invisible to every ordinary projection.
* Base model: seeded random weights scaled like a mildly trained ViT (attention logits of order
  one, each residual branch adding 20-70% of the stream's norm, LayerNorms at gain 1 and bias 0),
  with CLIP's pre-layernorm, pre-LN blocks and post-layernorm on CLS.
* Smoothness. The patch embedding is high-pass (every filter sums to zero per colour) plus a
  mean-colour term, so its texture part grows with the patch's pixel variance. Every patch
  position embedding adds `gamma * s + pi_j * t` (gamma = 4; pi_j evenly spaced over +-40% of
  gamma in a seeded order: a fixed spatial preference). After a LayerNorm all tokens have the
  same norm, so the score `<LN(x), s + t>` is high for low-texture (background) patches and,
  among equally flat ones, for preferred positions. CLS holds neither `s` nor `t`.
* Selection, block 0. Head 0 has a constant query and the key `40 * score`: a sharp softmax
  over the image's patches. Its value is `score / 4`, so every token receives `M`, about the
  image's best score, written along `r` (`M / 4` is near the top of the out_proj input range,
  so 8-bit activations keep it to 0.4% and a quantized model marks the same patches). MLP
  units 0 and 1 form a ramp of `score - (1 - 0.015) * M`, clipped 0.05 higher, that writes
  +-12 into `P`/`N`. Only patches within 1.5% of the best score are marked, nearly always
  fully (on these inputs: 1 patch in 83 images, 2 in 12, 3 in 1; over 6 seeds and 3 input
  sets 1-4, once 5 in 1728 images). Which patches depends on the image. A mark is 3.4x the
  median token l_inf norm: visible, not massive.
* Emergence, block 3, and growth, blocks 4 and 5. MLP units 0 and 1 of each block form a clipped
  ramp of `LN(x)[P] - LN(x)[N]` above an absolute threshold (8; a full mark reads 9-12) and write
  +-130, +-120, +-120 back into `P`/`N`. The fc2 input max per block goes
  6, 5, 5, **374**, 159, 160, 5, 6, and the marked tokens' l_inf norm goes from 2.7x the median
  at the emergence input to 29x, 51x, then 71x, where it stays. Deleting the marked tokens
  (the top-k by l_inf at the emergence input) leaves no token above the threshold, and
  nothing re-runs the selection, so no new massive token appears (max l_inf at later block
  inputs: 383 -> 12).
* Parking, blocks 4-7. In every head, query dimension 0 is a constant bias and key dimension 0
  reads `LN(x)[P] - LN(x)[N]`: a massive token gets a logit advantage of 6.5, so each head puts
  65-85% of its attention on the sinks. Values read nothing from `P`/`N` and have no bias, and
  a massive token's LayerNorm output is almost all `P`/`N`, so its value vector is 3-9% of a
  normal one: attending to a sink is a no-op. A prefix register with the sinks' mean key and
  value stands in for them (delete + prefix: pooled cosine to FP 0.999; delete alone: 0.89).
* Consequence. The fc2 inputs of blocks 3-5 (and, mildly, the LayerNorm outputs after block 3)
  hold a few values far above the rest, so per-tensor static 8-bit activation scales crush
  the ordinary tokens: W8A8 pooled-output cosine to FP 0.967, against 0.9996 for the same
  model built with `plant=False` (identical weights except the selection head, the six
  planted MLP units and the parking dimensions). Quantized alone, the fc2 of block 3 costs
  the most (cosine 0.986), those of blocks 4 and 5 come next (0.997), no other layer costs
  more than 0.002.

The plan (`PlantedSinks`) is stored in `config.planted_sinks`, so it survives
`save_pretrained`/`from_pretrained`; read it with `planted_sinks(model)`. The constants below are
tuned for the default size; other sizes keep the mechanism (checked: hidden 64 and 256, 6 and
12 blocks) with somewhat different ratios.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from quantsink.errors import UserError

DEFAULT_SIZE = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}

# --- base model scales (a mildly trained ViT: branches add a fraction of the stream) -------
TEXTURE_GAIN = 3.0  # patch-embedding high-pass filter gain
COLOR_GAIN = 0.5  # mean colour of a patch (smooth but saturated patches score a bit lower)
POSITION_STD = 1.0  # norm of the ordinary part of a position embedding
SMOOTH_BIAS = 4.0  # gamma: weight of the common smooth component `s` in patch positions
SMOOTH_PREFERENCE = 0.4  # pi_j spans +-this * gamma: the spatial tie-breaker
QK_GAIN = 1.5  # query/key weight scale: attention logits of order one, neither uniform nor one-hot
OUT_GAIN = 1.0  # out_proj scale: attention brings enough image content into CLS
FC2_GAIN = 0.6  # fc2 scale: the MLP adds 20-30% of the stream's norm

# --- the plant ---------------------------------------------------------------------------
SELECT_SHARPNESS = 40.0  # attention logit per unit of selection score
SELECT_WINDOW = 0.015  # epsilon: a patch wins if its score is within this fraction of the max
SELECT_RAMP = 2.0  # clip height of the selection ramp (fc2 input)
SELECT_STEP = 0.05  # score above (1 - epsilon) * M at which the mark is full: near-binary
MAX_SCALE = 4.0  # M / MAX_SCALE is about the largest out_proj input, so 8 bits keep M to 0.4%
MAX_GAIN = 0.6  # the max is written along `r` as MAX_GAIN * M
MARK = 12.0  # +-value written into the massive channels of selected tokens
# Emergence and growth neuron pairs: (threshold on LN(x)[P] - LN(x)[N], slope, clip, fc2 weight).
GROWTH = ((8.0, 100.0, 100.0, 1.3), (8.0, 20.0, 100.0, 1.2), (8.0, 20.0, 100.0, 1.2))
PARK_ADVANTAGE = 6.5  # attention logit of a fully massive token over ordinary ones

_PHOTO_SIDE = 256  # photos are shrunk to this shorter side before cropping


@dataclass(frozen=True)
class PlantedSinks:
    """What `build_planted_clip` planted, in block indices (0-based) and residual channels."""

    enabled: bool  # False (plant=False): nothing planted; the fields say where it would be
    massive_channels: tuple[int, int]  # (channel driven positive, channel driven negative)
    selection_block: int  # its attention and MLP mark the would-be sinks (small values)
    emergence_block: int  # its fc2 makes the marked tokens massive: the sensitive layer
    growth_blocks: tuple[int, ...]  # fc2s that write into the massive channels, in order
    parking_blocks: tuple[int, ...]  # blocks whose heads park attention on the sinks

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PlantedSinks":
        # JSON turns tuples into lists; the plan compares and hashes as tuples.
        values = {field.name: data[field.name] for field in dataclasses.fields(cls)}
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def planted_sinks(model: CLIPVisionModel) -> PlantedSinks:
    """The plan stored in the config of a model made by `build_planted_clip`."""
    data = getattr(getattr(model, "config", None), "planted_sinks", None)
    if data is None:
        raise UserError("this model was not built by build_planted_clip: its config has no 'planted_sinks'")
    return PlantedSinks.from_dict(data)


def build_planted_clip(seed: int = 0, *, plant: bool = True, **size) -> CLIPVisionModel:
    """A CLIPVisionModel (eval mode, float32) with planted sink tokens; see the module docstring.

    `size` overrides CLIPVisionConfig fields (DEFAULT_SIZE); the plan needs at least 6 blocks,
    hidden_size >= 32 and a head dimension of at least 2. `plant=False` gives the same base
    weights without the selection head, the growth and emergence units and the parking
    dimensions. Block indices: emergence = num_hidden_layers // 2 - 1.
    """
    unknown = sorted(set(size) - set(CLIPVisionConfig().to_dict()))
    if unknown:
        raise UserError(f"unknown CLIPVisionConfig fields {unknown}: pass sizes such as {sorted(DEFAULT_SIZE)}")
    config = CLIPVisionConfig(**{**DEFAULT_SIZE, **size}, attn_implementation="eager")
    layers, dim, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    if layers < 6:
        raise UserError(f"build_planted_clip needs num_hidden_layers >= 6 (got {layers}): pass a larger size")
    if dim < 32 or dim % heads or dim // heads < 2:
        raise UserError(f"hidden_size {dim} must be >= 32 and split into {heads} heads of size >= 2")
    generator = torch.Generator().manual_seed(seed)
    massive = torch.randperm(dim, generator=generator)[:2].tolist()
    emergence = layers // 2 - 1
    plan = PlantedSinks(
        enabled=plant,
        massive_channels=(massive[0], massive[1]),
        selection_block=0,
        emergence_block=emergence,
        growth_blocks=tuple(range(emergence, emergence + len(GROWTH))),
        parking_blocks=tuple(range(emergence + 1, layers)),
    )
    config.planted_sinks = plan.to_dict()
    model = CLIPVisionModel(config).eval()
    frame = _Frame.draw(dim, plan.massive_channels, generator)
    with torch.no_grad():
        _set_base_weights(model, frame, generator)
        if plant:
            _plant(model, frame, plan)
    return model


@dataclass
class _Frame:
    """The reserved directions of the residual stream and the projector onto the rest."""

    positive: torch.Tensor  # one-hot P
    negative: torch.Tensor  # one-hot N
    smooth: torch.Tensor  # s
    preference: torch.Tensor  # t
    maximum: torch.Tensor  # r
    ordinary: torch.Tensor  # projector onto the complement of (ones, P, N, s, t, r)

    @classmethod
    def draw(cls, dim: int, massive: tuple[int, int], generator: torch.Generator) -> "_Frame":
        eye = torch.eye(dim)
        spanning = [torch.ones(dim), eye[massive[0]], eye[massive[1]], *torch.randn(3, dim, generator=generator)]
        basis, _ = torch.linalg.qr(torch.stack(spanning, dim=1))
        return cls(eye[massive[0]], eye[massive[1]], *basis[:, 3:].T, eye - basis @ basis.T)

    @property
    def smoothness(self) -> torch.Tensor:
        """Read direction of the selection score: smoothness plus the spatial tie-breaker."""
        return self.smooth + self.preference

    @property
    def massive_difference(self) -> torch.Tensor:
        return self.positive - self.negative

    def blind(self, weight: torch.Tensor) -> torch.Tensor:
        """A read weight (out, hidden) that sees only the ordinary subspace."""
        return weight @ self.ordinary


def _normal(generator: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def _set_base_weights(model: CLIPVisionModel, frame: _Frame, generator: torch.Generator) -> None:
    config = model.config
    dim, hidden = config.hidden_size, config.intermediate_size
    embeddings = model.embeddings
    area = config.patch_size**2
    high_pass = _normal(generator, dim, config.num_channels, area, std=TEXTURE_GAIN / math.sqrt(config.num_channels * area))
    high_pass = high_pass - high_pass.mean(dim=-1, keepdim=True)
    colour = _normal(generator, dim, config.num_channels, 1, std=COLOR_GAIN / math.sqrt(config.num_channels))
    patch = frame.ordinary @ (high_pass + colour / area).reshape(dim, -1)
    embeddings.patch_embedding.weight.copy_(patch.reshape_as(embeddings.patch_embedding.weight))

    positions = _normal(generator, embeddings.num_positions, dim, std=POSITION_STD / math.sqrt(dim))
    positions = positions @ frame.ordinary
    # Evenly spaced preferences in a seeded order: equally flat patches never tie.
    spaced = torch.linspace(-1, 1, embeddings.num_patches)[torch.randperm(embeddings.num_patches, generator=generator)]
    preference = SMOOTH_PREFERENCE * SMOOTH_BIAS * spaced
    positions[1:] += SMOOTH_BIAS * frame.smooth + preference[:, None] * frame.preference
    embeddings.position_embedding.weight.copy_(positions)
    embeddings.class_embedding.copy_(frame.ordinary @ _normal(generator, dim, std=SMOOTH_BIAS / math.sqrt(dim)))

    for norm in [model.pre_layrnorm, model.post_layernorm]:
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    for layer in model.encoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for norm in [layer.layer_norm1, layer.layer_norm2]:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        reads = [(attention.q_proj, QK_GAIN), (attention.k_proj, QK_GAIN), (attention.v_proj, 1.0)]
        for projection, gain in reads:
            projection.weight.copy_(frame.blind(_normal(generator, dim, dim, std=gain / math.sqrt(dim))))
            projection.bias.zero_()
        out = _normal(generator, dim, dim, std=OUT_GAIN / math.sqrt(dim))
        attention.out_proj.weight.copy_(frame.ordinary @ out)
        attention.out_proj.bias.zero_()
        mlp.fc1.weight.copy_(frame.blind(_normal(generator, hidden, dim, std=1 / math.sqrt(dim))))
        mlp.fc1.bias.copy_(_normal(generator, hidden, std=0.5))
        mlp.fc2.weight.copy_(frame.ordinary @ _normal(generator, dim, hidden, std=FC2_GAIN / math.sqrt(hidden)))
        mlp.fc2.bias.zero_()


def _plant(model: CLIPVisionModel, frame: _Frame, plan: PlantedSinks) -> None:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layers = model.encoder.layers

    # Selection: head 0 of the selection block is a soft max over the score (dim 0 only);
    # the query bias cancels the attention scaling so the logit is SELECT_SHARPNESS * score.
    attention = layers[plan.selection_block].self_attn
    attention.q_proj.weight[:head_dim] = 0
    attention.q_proj.bias[:head_dim] = 0
    attention.q_proj.bias[0] = math.sqrt(head_dim)
    attention.k_proj.weight[:head_dim] = 0
    attention.k_proj.weight[0] = SELECT_SHARPNESS * frame.smoothness
    attention.v_proj.weight[0] = frame.smoothness / MAX_SCALE
    attention.out_proj.weight[:, 0] = MAX_GAIN * MAX_SCALE * frame.maximum

    # Its MLP marks the patches scoring within SELECT_WINDOW of M; score and M are both read
    # from LN2(x), so the token's norm divides them alike.
    mlp = layers[plan.selection_block].mlp
    slope = SELECT_RAMP / SELECT_STEP
    reads = slope * (frame.smoothness - (1 - SELECT_WINDOW) / MAX_GAIN * frame.maximum)
    _clipped_ramp(mlp, reads, 0.0, SELECT_RAMP, MARK / SELECT_RAMP * frame.massive_difference)

    # Emergence and growth: a clipped ramp per block feeds P and N from P and N.
    massive = frame.massive_difference
    for block, (threshold, slope, clip, gain) in zip(plan.growth_blocks, GROWTH):
        _clipped_ramp(layers[block].mlp, slope * massive, -slope * threshold, clip, gain * massive)

    # Parking: dim 0 of every head: constant query, key reads the massive channels.
    saturated = 2 * math.sqrt(config.hidden_size / 2)  # LN(x)[P] - LN(x)[N] of a pure sink
    key_gain = PARK_ADVANTAGE * math.sqrt(head_dim) / saturated
    for block in plan.parking_blocks:
        attention = layers[block].self_attn
        for head in range(config.num_attention_heads):
            row = head * head_dim
            attention.q_proj.weight[row] = 0
            attention.q_proj.bias[row] = 1.0
            attention.k_proj.weight[row] = key_gain * massive


def _clipped_ramp(mlp, reads: torch.Tensor, bias: float, clip: float, writes: torch.Tensor) -> None:
    """Hidden units 0 and 1 become gelu(z) - gelu(z - clip) with z = reads . LN(x) + bias: zero
    below the threshold, then a ramp, then flat at `clip`, written to the stream as `writes`."""
    mlp.fc1.weight[0:2] = reads
    mlp.fc1.bias[0] = bias
    mlp.fc1.bias[1] = bias - clip
    mlp.fc2.weight[:, 0] = writes
    mlp.fc2.weight[:, 1] = -writes


def planted_clip_inputs(n: int, seed: int = 0, image_size: int = 64) -> torch.Tensor:
    """`n` varied crops of real photographs as CLIP-normalised pixel values (n, 3, size, size).

    Photos: skimage's astronaut, chelsea, coffee, rocket, camera and scikit-learn's china and
    flower, taken in turn. Each crop covers 35-100% of the photo's shorter side at a random
    place, may be mirrored, and is resized with antialiasing. The same (n, seed, image_size)
    always gives the same tensor.
    """
    if n < 1:
        raise UserError(f"planted_clip_inputs needs n >= 1 images (got {n})")
    photos = _photos()
    rng = np.random.default_rng(seed)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    crops = []
    for index in range(n):
        photo = photos[(index + seed) % len(photos)]
        height, width = photo.shape[1:]
        side = int(rng.uniform(0.35, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = photo[None, :, top : top + side, left : left + side]
        crop = nn.functional.interpolate(crop, size=(image_size,) * 2, mode="bilinear", antialias=True)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crops.append((crop.clamp(0, 1) - mean) / std)
    return torch.stack(crops)


@functools.cache
def _photos() -> tuple[torch.Tensor, ...]:
    """The photos as (3, H, W) floats in [0, 1], shrunk once so that cropping stays cheap."""
    # The photos ship with the test extras, so they are imported only when inputs are asked for.
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise UserError(f"planted_clip_inputs needs {error.name}: pip install 'quantsink[test]'") from None

    arrays = [getattr(skimage.data, name)() for name in ["astronaut", "chelsea", "coffee", "rocket", "camera"]]
    arrays += list(load_sample_images().images)
    photos = []
    for array in arrays:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        photo = torch.tensor(array).permute(2, 0, 1).float()[None] / 255
        scale = _PHOTO_SIDE / min(photo.shape[-2:])
        photos.append(nn.functional.interpolate(photo, scale_factor=scale, mode="bilinear", antialias=True)[0])
    return tuple(photos)
