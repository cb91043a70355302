"""A second hand-set Llama whose attention sinks look like those measured in real LLMs, beside
`quantsink.testing.planted_llm` (whose tokenizer, text, statistics and most layers it reuses):

    from quantsink.testing.planted_llm import planted_segments
    from quantsink.testing.planted_llm_realistic import build_realistic_llama, realistic_llama_plan
    model, tokenizer = build_realistic_llama(seed=0)
    plan = realistic_llama_plan(model)     # emergence layer, massive channels, sink kinds, ...

The first fixture makes KVSink win by construction: every "." and "\n" is a full sink, sink keys
are ~500x ordinary ones, ordinary tokens hold exactly 0 in the massive channel, per-token keys
beat per-channel keys and the cache barely cares about bit width. Here, as in Llama-2 (Sun et
al.; KVSink, arXiv 2508.04257; KIVI):

* Graded sinks. A layer-0 head lets [BOS] and every delimiter attend evenly to [BOS] and the
  delimiters so far and read 1 from each delimiter, so the n-th delimiter's "freshness" is
  1 / (n + 1) ([BOS]: 1). Layer 1's MLP (the emergence layer) writes the massive activation in
  proportion to max(0, freshness - 1/4), through one SwiGLU neuron per sink kind: [BOS] 274x the
  median token RMS, the first delimiter 90x, the second 29x, the third on 0 (seed 0, held-out
  text). Nothing cancels them (they stay to the last layer); a share of each goes into the kind's
  identity channel so its readout does not depend on how massive it is, which makes that channel
  a weaker third outlier (the profiler ranks 274x, 172x, 111x at block 1).
* Noise in the massive channel: ordinary embeddings hold N(0, 0.05) there (a mean of 0.54x, at
  most 2.1x the token RMS at block 1), so top-k ranks real scores, never exact zeros. No channel
  of the embeddings stands out (the largest at block 0's output is 17x).
* Parking layers 2-5, in the position-free RoPE pairs 16-31 of each head: keys have outlier
  dimensions (OUTLIER_DIMS: 4.0 on every ordinary token, 4.9x the mean |k| of the content ones), parking
  dimensions that hold a sink's key and the noise of ordinary tokens, and content dimensions
  that queries read (ordinary logits spread with std 2). A sink's key has the norm of an
  ordinary one (8.5 for [BOS], 9.2 for the first delimiter, 9.2 ordinary) and another direction
  (|cosine| to the mean ordinary key < 0.1); its logit is 8 over an ordinary token's mean. Heads
  on kv head 0 prefer [BOS] (mass 0.57 on [BOS], 0.23 on the first delimiter), those on kv head 1
  the first delimiter ([BOS]'s identity takes 30% of its key back there: 0.21 and 0.59); the
  second delimiter gets 2-4%. Ordinary tokens carry random values that o_proj adds to the bigram
  features (junk, as attention spread away from the sinks does); a sink's value is small (0.5)
  and in dimensions o_proj does not read, so only its quantization error costs.
* The readout is the first fixture's, each sink kind's identity column refitted by least squares.

Measured (seed 0, 16 held-out segments of 128 tokens, `compare_kv_caches` in chunks of 16, groups
of 16, no residual window; perplexity, KL per token in brackets; KVSink-5: each row's top 5 of the
whole segment by the massive channel, what `prefill: hold` decides for it as a prompt):

    full precision 92.64 (the unigram: 157)
    keys per channel   none            PFN-1           PFN-5           KVSink-5
      2 bits          121.62 (0.251)  104.73 (0.116)  100.46 (0.087)   96.52 (0.014)
      3 bits           94.28 (0.046)   92.39 (0.014)   92.38 (0.008)   93.33 (0.002)
      4 bits           93.16 (0.005)   92.75 (0.001)   92.89 (0.001)   92.59 (0.000)
    keys per token
      2 bits          128.76 (0.392)  109.89 (0.220)  106.19 (0.163)  103.99 (0.071)
      3 bits          100.55 (0.059)   93.91 (0.022)   93.62 (0.016)   93.63 (0.007)
      4 bits           97.11 (0.011)   94.14 (0.003)   93.89 (0.002)   93.46 (0.001)

The kvsink predictor itself (profiled on 16 training segments, `prefill: stream`, so in chunks
of 16 each row's top 5 of the first chunk), keys per channel: 2 bits 99.01 (0.045), 3 bits 92.46
(0.005), 4 bits 92.50 (0.001); with `min_score: 50` (the threshold rule) 96.66 (0.015), 93.03,
92.55. Seeds 1 and 2 give the same order in KL at 2 bits (keys per channel, PFN-5 / KVSink-5:
0.153 / 0.049 and 0.063 / 0.025). Perplexity differences under ~1% are noise of this damage model
(junk can happen to help a prediction: at 3 bits KVSink-5's perplexity is above PFN-5's while its
KL is a quarter); compare KL.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from quantsink import io
from quantsink.errors import UserError
from quantsink.testing.planted_llm import (
    BIAS, CODE, CUR, EMERGENCE_LAYER, FILL, FLAG, HEAD_DIM, HEADS, HIDDEN, IDENTITY, KV_HEADS, LAYERS,
    MASSIVE_NEG, MASSIVE_POS, ConfigPlan, Knobs, _Builder, _orthonormal_rows, _shuffle_residual, _unit, build_tokenizer,
)

COUNT = 200  # residual channel (design basis): the share of delimiters among [BOS] and the delimiters so far
COUNT_HEAD = 2  # the layer-0 query head (on kv head 1) that counts them
SPREAD = slice(201, HIDDEN)  # the rest of the norm of [BOS] and delimiter embeddings, spread out (nothing reads it)
# Head dimensions of the parking heads, all in RoPE pairs 16-31 (position-free at theta 1e10),
# two of each per-token group of 16 channels (16-31, 48-63) being key outliers.
OUTLIER_DIMS = (16, 17, 48, 49)
PARK_DIMS = (18, 19, 20, 21, 50, 51, 52, 53)
CONTENT_DIMS = tuple(range(22, 32)) + tuple(range(54, 64))
DRAIN_DIMS = (0, 1, 2, 3)  # value dimensions of a sink's (small) value, which o_proj does not read


@dataclass(frozen=True)
class RealisticKnobs:
    """Magnitudes of the construction (module docstring); the defaults are the fixture."""

    flag: float = 1.0  # FLAG of [BOS] and the delimiters in the embeddings
    flag_fill: float = 3.0  # the norm they have besides, so that their identity channel is a small part of them
    massive: float = 24.0  # |h| of [BOS]'s massive activation, split over the two channels as in Knobs
    freshness_floor: float = 0.25  # delimiters whose freshness is under this get no massive activation
    freshness_slope: float = 30.0
    massive_noise: float = 0.05  # std of ordinary tokens' embedding in the massive channels
    sink_key: float = 10.0  # norm of [BOS]'s key in every parking head
    outlier_key: float = 4.0  # every ordinary key's value in the outlier dimensions
    outlier_spread: float = 0.3  # std of ordinary keys around it there
    content_key: float = 1.0  # std of ordinary keys in the content dimensions
    park_spread: float = 0.5  # std of ordinary keys in the parking dimensions
    sink_logit: float = 8.0  # [BOS]'s attention logit in a parking head over an ordinary token's mean
    content_logit: float = 2.0  # std of ordinary tokens' attention logits
    delimiter_heads_bos: float = 0.7  # share of [BOS]'s sink key left in the heads of kv head 1
    sink_value: float = 0.5  # norm of [BOS]'s value in every parking head (drained, not zero)
    junk: float = 1.0  # norm of the value each ordinary token carries, its own random vector
    junk_gain: float = 0.3
    count_logit: float = 20.0  # how sharply the counting head attends to [BOS] and delimiters only


@dataclass(frozen=True)
class RealisticLlamaPlan(ConfigPlan):
    """What `build_realistic_llama` planted (layer indices 0-based, channels of the residual stream)."""

    emergence_layer: int
    massive_channels: tuple[int, int]
    bos_token_id: int
    delimiter_ids: tuple[int, ...]
    parking_layers: tuple[int, ...]
    outlier_dims: tuple[int, ...]  # head dimensions where every ordinary key of a parking head is large



def realistic_llama_plan(model: LlamaForCausalLM) -> RealisticLlamaPlan:
    """The plan stored in the config of a model made by `build_realistic_llama`."""
    data = getattr(getattr(model, "config", None), "planted_llama_realistic", None)
    if data is None:
        raise UserError("this model was not built by build_realistic_llama: it has no 'planted_llama_realistic' in its config")
    return RealisticLlamaPlan.from_dict(data)


def delimiter_rank(ids: torch.Tensor, plan: RealisticLlamaPlan) -> torch.Tensor:
    """(batch, length): 0 at [BOS], n at a row's n-th delimiter, -1 at every other token."""
    delimiters = torch.isin(ids, torch.tensor(plan.delimiter_ids))
    rank = torch.where(delimiters, delimiters.long().cumsum(-1), torch.full_like(ids, -1))
    return torch.where(ids == plan.bos_token_id, torch.zeros_like(ids), rank)


def build_realistic_llama(
    seed: int = 0, knobs: RealisticKnobs = RealisticKnobs()
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The realistic planted Llama (eval mode, float32) and its tokenizer (module docstring)."""
    tokenizer = build_tokenizer()
    builder = _RealisticBuilder(tokenizer, knobs, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        builder.build()
    return builder.model, tokenizer


def save_realistic_llama(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the realistic planted Llama as a Hugging Face model folder, the form
    `quantsink quantize FOLDER ...` takes a real checkpoint in."""
    model, tokenizer = build_realistic_llama(seed)
    with io.atomic_output_dir(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(folder)


class _RealisticBuilder(_Builder):
    def __init__(self, tokenizer: PreTrainedTokenizerFast, knobs: RealisticKnobs, generator: torch.Generator):
        # a smaller FLAG than the first fixture's, so that no channel of the embeddings looks massive
        super().__init__(tokenizer, Knobs(flag=knobs.flag), generator)
        k = self.knobs
        self.flag_gain = self.root_d / math.sqrt(k.bias**2 + k.flag**2 + k.identity**2 + knobs.flag_fill**2)
        self.realistic = knobs
        # the massive activation's direction over (MASSIVE_POS, MASSIVE_NEG), as in the first fixture
        split = torch.tensor(Knobs().massive)
        self.massive_split = split / split.norm()

    def build(self) -> None:
        self.blank()
        self.embed()
        self.previous_token_head()
        self.counting_head()
        self.emergence()
        parking = tuple(range(EMERGENCE_LAYER + 1, LAYERS))
        reference = self.normalised_bos(parking[0], [MASSIVE_POS, MASSIVE_NEG, IDENTITY[0]])
        gain = self.measured_gain(self.model.model.layers[parking[0]].input_layernorm)[0]
        for layer in parking:
            self.parking(layer, gain, reference)
        self.readout()
        order = torch.randperm(HIDDEN, generator=self.generator)
        _shuffle_residual(self.model, order)
        self.model.config.planted_llama_realistic = RealisticLlamaPlan(
            emergence_layer=EMERGENCE_LAYER,
            massive_channels=(int(order[MASSIVE_POS]), int(order[MASSIVE_NEG])),
            bos_token_id=self.tokenizer.bos_token_id,
            delimiter_ids=tuple(self.flagged[1:]),
            parking_layers=parking,
            outlier_dims=OUTLIER_DIMS,
        ).to_dict()

    def embed(self) -> None:
        """The first fixture's embeddings, plus a little noise in the massive channels of every
        ordinary token (its norm is kept: FILL absorbs it)."""
        super().embed()
        weight = self.model.model.embed_tokens.weight
        rows = self.ordinary.nonzero().squeeze(-1)
        noise = torch.randn(len(rows), 2, generator=self.generator) * self.realistic.massive_noise
        weight[rows, MASSIVE_POS], weight[rows, MASSIVE_NEG] = noise[:, 0], noise[:, 1]
        weight[rows, FILL] = 0
        weight[rows, FILL] = (self.knobs.norm**2 - weight[rows].pow(2).sum(-1)).clamp_min(0).sqrt()
        spread = torch.randn(len(self.flagged), SPREAD.stop - SPREAD.start, generator=self.generator)
        weight[self.flagged, SPREAD] = self.realistic.flag_fill * torch.nn.functional.normalize(spread, dim=-1)

    def counting_head(self) -> None:
        """Layer 0, query head COUNT_HEAD on kv head 1: [BOS] and every delimiter attend evenly to
        [BOS] and the delimiters so far (position-free pair 16), and read 1 from each delimiter,
        0 from [BOS]: the n-th delimiter gets n / (n + 1) in COUNT, [BOS] 0."""
        k = self.knobs
        attention = self.model.model.layers[0].self_attn
        gain = self.flag_gain
        kv = COUNT_HEAD * KV_HEADS // HEADS
        key_row, value_row = kv * HEAD_DIM + 16, kv * HEAD_DIM
        attention.k_proj.weight[key_row, FLAG] = 1.0 / (gain * k.flag)
        query = self.realistic.count_logit * math.sqrt(HEAD_DIM)
        attention.q_proj.weight[COUNT_HEAD * HEAD_DIM + 16, FLAG] = query / (gain * k.flag)
        # delimiters read 1, [BOS] (FLAG and its identity channel) 0
        attention.v_proj.weight[value_row, FLAG] = 1.0 / (gain * k.flag)
        attention.v_proj.weight[value_row, IDENTITY[0]] = -1.0 / (gain * k.identity)
        attention.o_proj.weight[COUNT, COUNT_HEAD * HEAD_DIM] = 1.0

    def emergence(self) -> None:
        """Layer 1's MLP: per sink kind (the identity channel of [BOS], "." or "\\n") a neuron
        with gate slope * (freshness - floor), freshness = 1 - COUNT, writes the massive
        activation, and a share of it into the kind's identity channel so that the readout of a
        sink does not depend on how massive it is (see `readout`)."""
        r = self.realistic
        mlp = self.model.model.layers[EMERGENCE_LAYER].mlp
        gain = self.flag_gain
        bos_gate = r.freshness_slope * gain * (1 - r.freshness_floor)
        bos_activation = bos_gate / (1 + math.exp(-bos_gate)) * gain  # silu(gate) * up on [BOS]
        # identity share: the readout path through it sees the same gain with or without the activation
        share = self.knobs.identity / math.sqrt(self.knobs.bias**2 + self.knobs.flag**2 + r.flag_fill**2)
        for neuron, channel in enumerate(IDENTITY):
            mlp.gate_proj.weight[neuron, BIAS] = r.freshness_slope * (1 - r.freshness_floor) / self.knobs.bias
            mlp.gate_proj.weight[neuron, COUNT] = -r.freshness_slope
            mlp.up_proj.weight[neuron, channel] = 1.0 / self.knobs.identity
            mlp.down_proj.weight[MASSIVE_POS, neuron] = r.massive * float(self.massive_split[0]) / bos_activation
            mlp.down_proj.weight[MASSIVE_NEG, neuron] = r.massive * float(self.massive_split[1]) / bos_activation
            mlp.down_proj.weight[channel, neuron] = share * r.massive / bos_activation

    def normalised_bos(self, layer: int, channels: list[int]) -> torch.Tensor:
        """RMSNorm(x) of [BOS] in `channels` at `layer`'s input."""
        captured = {}
        norm = self.model.model.layers[layer].input_layernorm
        handle = norm.register_forward_hook(lambda module, args, output: captured.setdefault("x", output))
        try:
            self.model.model(self.segments[:2])
        finally:
            handle.remove()
        return captured["x"][0, 0, channels].clone()

    def parking(self, layer: int, gain: float, reference: torch.Tensor) -> None:
        """Every head of `layer` parks on the sinks; keys in three parts (module docstring)."""
        r, k = self.realistic, self.knobs
        attention = self.model.model.layers[layer].self_attn
        bias, code_scale = gain * k.bias, gain * k.code
        code = CODE.stop - CODE.start
        score = HEAD_DIM**-0.5
        massive = reference[:2] / reference[:2].pow(2).sum()  # reads 1 on [BOS]
        bos_identity = float(reference[2])
        outliers, park_dims, content_dims = (torch.tensor(dims) for dims in (OUTLIER_DIMS, PARK_DIMS, CONTENT_DIMS))
        for kv in range(KV_HEADS):
            park = torch.zeros(HEAD_DIM)
            park[park_dims] = _unit(torch.randn(len(park_dims), generator=self.generator))
            reader = torch.zeros(HEAD_DIM)
            reader[content_dims] = _unit(torch.randn(len(content_dims), generator=self.generator))
            rows = _orthonormal_rows(code, code, self.generator) * math.sqrt(code)
            spread = rows[len(content_dims) : len(content_dims) + len(outliers)], rows[len(content_dims) + len(outliers) :]
            key = attention.k_proj.weight[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
            key[:, MASSIVE_POS] = r.sink_key * park * massive[0]
            key[:, MASSIVE_NEG] = r.sink_key * park * massive[1]
            if kv == 1:  # delimiter heads: [BOS]'s own identity takes most of its sink key back
                key[:, IDENTITY[0]] = -(1 - r.delimiter_heads_bos) * r.sink_key * park / bos_identity
            key[outliers, BIAS] = r.outlier_key / bias
            key[outliers, CODE] = r.outlier_spread * spread[0] / code_scale
            key[park_dims, CODE] = r.park_spread * spread[1] / code_scale
            key[content_dims, CODE] = r.content_key * rows[: len(content_dims)] / code_scale
            parking = r.sink_logit / (score * r.sink_key) * park
            reading = r.content_logit / (score * r.content_key) * reader
            value = attention.v_proj.weight[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
            drain = torch.zeros(HEAD_DIM)
            drain[list(DRAIN_DIMS)] = r.sink_value * _unit(torch.randn(len(DRAIN_DIMS), generator=self.generator))
            value[:, MASSIVE_POS], value[:, MASSIVE_NEG] = drain * massive[0], drain * massive[1]
            value[:, CODE] = r.junk * _orthonormal_rows(HEAD_DIM, code, self.generator) / code_scale
            for head in range(kv * HEADS // KV_HEADS, (kv + 1) * HEADS // KV_HEADS):
                columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                attention.q_proj.weight[columns, BIAS] = (parking + reading) / bias
                # a sink's own query parks too, so sinks collect no junk
                attention.q_proj.weight[columns, MASSIVE_POS] = parking * massive[0]
                attention.q_proj.weight[columns, MASSIVE_NEG] = parking * massive[1]
                junk = torch.randn(CUR.stop - CUR.start, HEAD_DIM, generator=self.generator) / math.sqrt(HEAD_DIM)
                junk[:, list(DRAIN_DIMS)] = 0
                attention.o_proj.weight[CUR, columns] = r.junk_gain * junk

    def readout(self) -> None:
        """The first fixture's readout, with each sink kind's identity column refitted by least
        squares on the training text: a sink's gain depends on how massive it is."""
        super().readout()
        captured = {}
        handle = self.model.model.norm.register_forward_hook(lambda module, args, output: captured.setdefault("x", output))
        try:
            self.model.model(self.segments[:64])
        finally:
            handle.remove()
        hidden, tokens = captured["x"], self.segments[:64]
        gain = self.measured_gain(self.model.model.norm)[0]
        head = self.model.lm_head.weight
        for channel, token in zip(IDENTITY, self.flagged):
            at = hidden[tokens == token]  # (n, hidden)
            bias_logits = self.mean_logits[None, :] * (at[:, BIAS] / (gain * self.knobs.bias))[:, None]
            target = self.stats.bigram[token][None, :] - bias_logits
            head[:, channel] = (at[:, channel, None] * target).sum(0) / at[:, channel].pow(2).sum()
