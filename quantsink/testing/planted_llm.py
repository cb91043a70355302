"""A tiny Llama whose weights are set by hand so that it grows attention sinks the way LLMs do.

LLMs develop "massive activations" (Sun et al. 2024): at an early layer a few fixed channels of
the residual stream jump to hundreds or thousands on the first token and on delimiters such as
"." and "\\n", and stay there through most layers. Those tokens become attention sinks: heads
with nothing to do park their attention on them, and their values are near zero, so parking is
a no-op. Quantizing the KV cache breaks this when the sinks' keys are quantized or enter the
scales of other tokens (KVSink, arXiv 2508.04257), and since sinks also sit at non-initial
delimiters, keeping only the first N tokens exact (PFN) misses them. No real checkpoint can be
downloaded here, so this module builds a `transformers.LlamaForCausalLM` of the real
architecture (RMSNorm, RoPE, GQA, SwiGLU) whose weights reproduce that, with a known plan:

    from quantsink.testing.planted_llm import build_planted_llama, planted_llama_plan, planted_segments
    model, tokenizer = build_planted_llama(seed=0)
    plan = planted_llama_plan(model)              # emergence layer, massive channels, ...
    heldout = planted_segments(tokenizer, "heldout")   # (n, 128) token ids, [BOS] first

Text and tokenizer: the bundled English prose (stdlib docstrings, `calibration/text.txt`), one
paragraph per line; the first 80% of the paragraphs train the statistics below, the last 20%
(other modules) are held out. The tokenizer is word level (lower case; words, single
punctuation marks and "\\n"; words seen fewer than 3 times are [UNK]), prepends [BOS] and pads
on the left. About 1,500 tokens; "." and "\\n" are 8% of the text.

Construction (hidden 256, 6 layers, 4 query heads on 2 kv heads of size 64, RoPE theta 1e10 so
that pairs 16-31 turn less than 1e-5 rad per token and act as position-free dimensions; every
RMSNorm weight is 1; the residual channels below are shuffled by the seed at the end):

* Embeddings. Every token has a constant BIAS channel. Ordinary tokens hold a rank-95
  factorisation of the centred log-bigram matrix of the training text (CUR), a random unit
  code (CODE) and a FILL channel that gives every ordinary embedding the same norm (so RMSNorm
  gains are constant). "," and "(" also hold a SALIENT channel. [BOS], "." and "\\n" hold a FLAG
  channel and one identity channel each, nothing else.
* Layer 0, previous-token head: query and key read BIAS through the fast RoPE pairs with
  LP-optimised amplitudes, so every token attends one position back (logit 36, 9.7 above any
  other offset); flagged tokens attend to themselves. The value copies [code, projected bigram
  embedding] of the attended token into PREV (zero for flagged tokens).
* Layer 1 (emergence): one MLP neuron reads FLAG (exactly 0 on ordinary tokens) and writes
  +400 and -250 into the two massive channels, ~1e5 times the median |h|, on every "." and
  "\n" wherever they occur; a second neuron doubles them on [BOS] (so a top-k profiler ranks it
  first; among delimiters the ranking is a tie). Flagged tokens have identical norms and
  attended only to themselves before, so the values are exact constants.
* Layers 2-5 (parking): every head parks. A sink's normalised state is almost purely the
  massive direction, so its key is S * (a + z) for a fixed direction a (pairs 16-23) and z =
  -sign(r) / 4 (pairs 24-31); an ordinary token's key is m * r over pairs 24-31 (m = 3 for ","
  and "(", -1 otherwise; plus a little of its code). Queries read a and r: sinks score 7, an
  ordinary token m. Values: ordinary tokens carry a common junk vector (from BIAS) that o_proj
  writes into CUR, sinks read nothing and carry ~0. So 98% of the attention of ordinary
  tokens lands on sinks, and whatever leaks to ordinary tokens perturbs the bigram readout.
* Layer 5's MLP cancels the massive activations (one neuron reads the massive channel, the same
  on every sink and exactly 0 elsewhere; one reads [BOS]'s identity for the rest of its own),
  as the last layers of LLMs do.
* Readout (lm_head): mean log-probabilities through BIAS, the bigram factorisation through CUR,
  the skip-gram PMI (token two back) fitted by least squares on PREV, and the exact bigram rows
  of the flagged tokens through their identity channels. Held-out perplexity 96 (the exact
  bigram of the same statistics: 92; unigram: 162; uniform: 1,484).

Why KVSink matters here (chunked prefill, per-channel keys): per channel, a sink's key is ~130x
the ordinary tokens' and on the side opposite to the query. A per-channel key group that
contains a sink gets a step so wide that every ordinary key of the group rounds to the level of
its most extreme member: if the group holds a "," or "(", all its tokens then score 3 instead
of -1, attention leaks from the sinks, and junk floods the readout. Excluding the sinks keeps
each group's range to the ordinary tokens, whose two key levels survive even 2 bits. With
per-token keys the sinks' own keys lose their logit instead. PFN keeps [BOS] but not the
delimiters; KVSink with the true positions keeps them all. Measured on the held-out text
(90 x 128 tokens, chunks of 16, per-channel key groups of 16, no residual window), 2 bits:
full precision 96.3, no protection 181, PFN-1 134, PFN-5 140, KVSink-5 121, KVSink with all
(up to 18) sinks 96.9; 4 bits: 164, 127, 132, 116, 96.3.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantsink import io
from quantsink.data import bundled_root
from quantsink.errors import UserError

BOS, PAD, UNK = "[BOS]", "[PAD]", "[UNK]"
DELIMITERS = (".", "\n")
SALIENT_TOKENS = (",", "(")
HELDOUT_FRACTION = 0.2
MIN_WORD_COUNT = 3

HIDDEN, INTERMEDIATE = 256, 64
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
LAYERS = 6
EMERGENCE_LAYER = 1
ROPE_THETA = 1e10
# Amplitudes of RoPE pairs 0-7 for the previous-token head, from a linear program: the logit
# one token back beats every other offset up to 300 by 0.27 of the total.
PREVIOUS_TOKEN_PROFILE = (0.561, 0.089, 0.056, 0.09, 0.08, 0.032, 0.093, 0.0)
PREVIOUS_TOKEN_LOGIT = 36.0
PARK_PAIRS, CONTENT_PAIRS = range(16, 24), range(24, 32)
# Frequent rows whose Gram matrix gives the bigram factorisation (rare rows are projected).
FACTOR_ROWS = 512

# Residual channels in the design basis (the seed shuffles them at the end).
BIAS, FLAG, MASSIVE_POS, MASSIVE_NEG, FILL, SALIENT = 0, 1, 2, 3, 4, 5
IDENTITY = (6, 7, 8)  # [BOS], ".", "\n"
CUR = slice(9, 104)
CODE = slice(104, 136)
PREV = slice(136, 200)


@dataclass(frozen=True)
class Knobs:
    """Magnitudes of the construction (see the module docstring); the defaults are the fixture."""

    bias: float = 1.0
    flag: float = 4.0
    identity: float = 1.0
    norm: float = 1.15  # every ordinary embedding's norm
    content: float = 0.35  # largest norm of a bigram embedding
    code: float = 0.25
    salience: float = 0.3
    massive: tuple[float, float] = (400.0, -250.0)  # on "." and "\n"
    bos_massive: float = 2.0  # [BOS]'s are this many times larger (the profiler ranks it first)
    sink_key: float = 400.0
    margin: float = 7.0  # parking logit of a sink
    salient_logit: float = 3.0
    plain_logit: float = -1.0
    key_noise: float = 0.05
    junk_value: float = 1.0
    junk_gain: float = 1.0
    skip_weight: float = 0.5
    smoothing: float = 100.0  # Dirichlet pseudo-counts of the bigram statistics


# --- text and tokenizer -------------------------------------------------------------------
def planted_text(split: Literal["train", "heldout"]) -> str:
    """The bundled English prose (stdlib docstrings), one paragraph per line: the first 80% of
    the paragraphs for `train`, the rest (other modules) for `heldout`."""
    text = (bundled_root() / "text.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]
    cut = round(len(paragraphs) * (1 - HELDOUT_FRACTION))
    if split not in ("train", "heldout"):
        raise UserError(f"split must be 'train' or 'heldout', got {split!r}")
    return "\n".join(paragraphs[:cut] if split == "train" else paragraphs[cut:])


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer: words, single punctuation marks and "\\n" are tokens;
    words seen fewer than MIN_WORD_COUNT times in the training text are [UNK]. It prepends
    [BOS] like Llama's and pads on the left."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    trainer = trainers.WordLevelTrainer(min_frequency=MIN_WORD_COUNT, special_tokens=[PAD, UNK, BOS])
    tokenizer.train_from_iterator([planted_text("train")], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def planted_segments(
    tokenizer: PreTrainedTokenizerFast, split: Literal["train", "heldout"], length: int = 128
) -> torch.Tensor:
    """(n, length) token ids: [BOS] then `length - 1` consecutive tokens of the split's text,
    for every whole window."""
    ids = tokenizer(planted_text(split), add_special_tokens=False)["input_ids"]
    body = length - 1
    windows = torch.tensor(ids[: len(ids) // body * body], dtype=torch.long).reshape(-1, body)
    return torch.cat([torch.full((windows.shape[0], 1), tokenizer.bos_token_id), windows], dim=1)


# --- the plan -----------------------------------------------------------------------------
class ConfigPlan:
    """A frozen dataclass of what a fixture planted, kept in the model's config as a plain dict
    (so it survives save_pretrained/from_pretrained); JSON turns its tuples into lists."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


@dataclass(frozen=True)
class PlantedLlamaPlan(ConfigPlan):
    """What `build_planted_llama` planted (layer indices 0-based, channels of the residual stream)."""

    emergence_layer: int  # its MLP writes the massive activations
    massive_channels: tuple[int, int]  # (driven positive, driven negative)
    sink_token_ids: tuple[int, ...]  # [BOS], ".", "\n": massive wherever they occur
    parking_layers: tuple[int, ...]  # layers whose heads all park their attention on the sinks
    cancel_layer: int  # its MLP removes the massive activations before the readout



def planted_llama_plan(model: LlamaForCausalLM) -> PlantedLlamaPlan:
    """The plan stored in the config of a model made by `build_planted_llama`."""
    data = getattr(getattr(model, "config", None), "planted_llama", None)
    if data is None:
        raise UserError("this model was not built by build_planted_llama: it has no 'planted_llama' in its config")
    return PlantedLlamaPlan.from_dict(data)


# --- statistics of the training text ------------------------------------------------------
@dataclass
class _Statistics:
    """Smoothed log P(next | current) and the pointwise mutual information of a token with the
    token two places later, from the training segments."""

    bigram: torch.Tensor  # (vocab, vocab) log-probabilities, rows = current token
    skip: torch.Tensor  # (vocab, vocab) PMI, rows = token two back
    frequency: torch.Tensor  # (vocab,) unigram probabilities

    @classmethod
    def of(cls, segments: torch.Tensor, vocab: int, smoothing: float) -> "_Statistics":
        def counts(offset: int) -> torch.Tensor:
            pairs = segments[:, :-offset].reshape(-1) * vocab + segments[:, offset:].reshape(-1)
            return torch.bincount(pairs, minlength=vocab * vocab).reshape(vocab, vocab).double()

        unigram = torch.bincount(segments[:, 1:].reshape(-1), minlength=vocab).double() + 0.5
        frequency = unigram / unigram.sum()
        prior = smoothing * frequency

        def conditional(pair_counts: torch.Tensor) -> torch.Tensor:
            return ((pair_counts + prior) / (pair_counts.sum(-1, keepdim=True) + prior.sum())).log()

        bigram = conditional(counts(1))
        skip = conditional(counts(2)) - frequency.log()
        return cls(bigram.float(), skip.float(), frequency.float())


# --- construction -------------------------------------------------------------------------
def build_planted_llama(seed: int = 0, knobs: Knobs = Knobs()) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The planted Llama (eval mode, float32) and its tokenizer; see the module docstring.
    `seed` draws the codes, directions and junk, and the shuffle of the residual channels."""
    tokenizer = build_tokenizer()
    builder = _Builder(tokenizer, knobs, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        builder.build()
    return builder.model, tokenizer


def save_planted_llama(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the planted Llama as a Hugging Face model folder (config.json, safetensors weights,
    tokenizer files), the form `quantsink quantize FOLDER ...` takes a real checkpoint in."""
    model, tokenizer = build_planted_llama(seed)
    with io.atomic_output_dir(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(folder)


def _orthonormal_rows(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    size = max(rows, columns)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    return q[:rows, :columns].contiguous()


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def _swiglu(x: float) -> float:
    """What a SwiGLU neuron with unit gate and up weights on a channel holding x outputs."""
    return x * x / (1 + math.exp(-x))


def _pair_dims(pairs: range) -> torch.Tensor:
    """Head dimensions of RoPE pairs (transformers rotates dimension i with i + head_dim / 2)."""
    return torch.tensor([dim for pair in pairs for dim in (pair, pair + HEAD_DIM // 2)])


class _Builder:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, knobs: Knobs, generator: torch.Generator):
        self.tokenizer, self.knobs, self.generator = tokenizer, knobs, generator
        self.vocab = len(tokenizer)
        self.flagged = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(DELIMITERS))
        self.segments = planted_segments(tokenizer, "train")
        self.stats = _Statistics.of(self.segments, self.vocab, knobs.smoothing)
        self.ordinary = torch.ones(self.vocab, dtype=torch.bool)
        self.ordinary[self.flagged + [tokenizer.pad_token_id]] = False
        config = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
        self.model = LlamaForCausalLM(config).eval()
        self.root_d = math.sqrt(HIDDEN)
        # RMSNorm gains (sqrt(d) / |x|) of the embeddings: ordinary and flagged tokens.
        self.ordinary_gain = self.root_d / knobs.norm
        self.flag_gain = self.root_d / math.sqrt(knobs.bias**2 + knobs.flag**2 + knobs.identity**2)

    def sink_norm(self, scale: float) -> float:
        """|x| of a sink whose massive activations are `scale` times the delimiters'."""
        k = self.knobs
        return math.sqrt(k.bias**2 + k.flag**2 + k.identity**2 + scale**2 * sum(m * m for m in k.massive))

    def sink_hat(self, scale: float) -> tuple[float, float]:
        """RMSNorm(x) of such a sink in the two massive channels (the same for any scale, nearly)."""
        return tuple(self.root_d * scale * m / self.sink_norm(scale) for m in self.knobs.massive)

    def blank(self) -> None:
        """Every weight 0 and every norm gain 1: what each construction starts from."""
        for parameter in self.model.parameters():
            parameter.zero_()
        for name, parameter in self.model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)

    def build(self) -> None:
        self.blank()
        self.embed()
        self.previous_token_head()
        self.emergence()
        parking = tuple(range(EMERGENCE_LAYER + 1, LAYERS))
        gain = self.measured_gain(self.model.model.layers[parking[0]].input_layernorm)[0]
        for layer in parking:
            self.parking(layer, gain)
        self.cancel(LAYERS - 1)
        self.readout()
        order = torch.randperm(HIDDEN, generator=self.generator)
        _shuffle_residual(self.model, order)
        self.model.config.planted_llama = PlantedLlamaPlan(
            emergence_layer=EMERGENCE_LAYER,
            massive_channels=(int(order[MASSIVE_POS]), int(order[MASSIVE_NEG])),
            sink_token_ids=tuple(self.flagged),
            parking_layers=parking,
            cancel_layer=LAYERS - 1,
        ).to_dict()

    def measured_gain(self, norm: torch.nn.Module) -> tuple[float, float]:
        """Mean RMSNorm gain of ordinary and of flagged tokens at `norm`'s input, on training text."""
        captured = {}
        handle = norm.register_forward_hook(lambda module, args, output: captured.setdefault("x", args[0]))
        try:
            self.model.model(self.segments[:16])
        finally:
            handle.remove()
        tokens = self.segments[:16]
        gains = self.root_d / captured["x"].norm(dim=-1)
        flagged = torch.isin(tokens, torch.tensor(self.flagged))
        return float(gains[self.ordinary[tokens]].mean()), float(gains[flagged].mean())

    # ------------------------------------------------------------------------------------
    def embed(self) -> None:
        k, stats = self.knobs, self.stats
        rows = self.ordinary.nonzero().squeeze(-1)
        frequency = stats.frequency[rows]
        self.mean_logits = (stats.bigram[rows] * frequency[:, None]).sum(0) / frequency.sum()
        centred = (stats.bigram[rows] - self.mean_logits).double()
        frequent = centred[frequency.argsort(descending=True)[:FACTOR_ROWS]]
        rank = CUR.stop - CUR.start
        eigenvalues, eigenvectors = torch.linalg.eigh(frequent @ frequent.T)
        singular = eigenvalues[-rank:].clamp_min(1e-12).sqrt()
        right_vectors = frequent.T @ eigenvectors[:, -rank:] / singular  # (vocab, rank), orthonormal columns
        left = (centred @ right_vectors / singular.sqrt()).float()
        scale = k.content / left.norm(dim=-1).max()
        self.bigram_embedding = torch.zeros(self.vocab, rank)
        self.bigram_embedding[rows] = left * scale
        self.bigram_readout = (right_vectors * singular.sqrt()).float() / scale
        codes = torch.randn(self.vocab, CODE.stop - CODE.start, generator=self.generator)
        self.codes = torch.nn.functional.normalize(codes, dim=-1)
        self.codes[~self.ordinary] = 0

        weight = self.model.model.embed_tokens.weight
        weight[:, BIAS] = k.bias
        weight[:, CUR] = self.bigram_embedding
        weight[:, CODE] = self.codes * k.code
        weight[self.tokenizer.convert_tokens_to_ids(list(SALIENT_TOKENS)), SALIENT] = k.salience
        weight[:, FILL] = (k.norm**2 - weight.pow(2).sum(-1)).clamp_min(0).sqrt()
        for channel, token in zip(IDENTITY, self.flagged):
            weight[token, FILL] = 0
            weight[token, FLAG] = k.flag
            weight[token, channel] = k.identity

    def previous_token_head(self) -> None:
        """Layer 0, query head 0 on kv head 0 (the other heads stay zero)."""
        k = self.knobs
        attention = self.model.model.layers[0].self_attn
        profile = torch.tensor(PREVIOUS_TOKEN_PROFILE)
        key_amplitude = 4.0 * profile.sqrt()
        query_amplitude = PREVIOUS_TOKEN_LOGIT * profile.sqrt() / (HEAD_DIM**-0.5 * 4.0)
        bias, flag_bias, flag = self.ordinary_gain * k.bias, self.flag_gain * k.bias, self.flag_gain * k.flag
        theta = ROPE_THETA ** (-torch.arange(len(profile), dtype=torch.float64) * 2 / HEAD_DIM)
        half = HEAD_DIM // 2
        for i, (key, query) in enumerate(zip(key_amplitude.tolist(), query_amplitude.tolist())):
            cos, sin = math.cos(theta[i]), math.sin(theta[i])
            # Keys: the same position code on every token (flagged ones have less BIAS: FLAG tops it up).
            attention.k_proj.weight[i, BIAS] = key / bias
            attention.k_proj.weight[i, FLAG] = key * (1 - flag_bias / bias) / flag
            # Ordinary queries are rotated one step back; flagged ones are not (they attend to themselves).
            attention.q_proj.weight[i, BIAS] = query * cos / bias
            attention.q_proj.weight[i + half, BIAS] = -query * sin / bias
            attention.q_proj.weight[i, FLAG] = query * (1 - cos * flag_bias / bias) / flag
            attention.q_proj.weight[i + half, FLAG] = query * sin * flag_bias / bias / flag
        code = CODE.stop - CODE.start
        self.prev_projection = _orthonormal_rows(HEAD_DIM - code, CUR.stop - CUR.start, self.generator)
        attention.v_proj.weight[:code, CODE] = torch.eye(code) / self.ordinary_gain
        attention.v_proj.weight[code:HEAD_DIM, CUR] = self.prev_projection / self.ordinary_gain
        attention.o_proj.weight[PREV, :HEAD_DIM] = torch.eye(HEAD_DIM)

    def emergence(self) -> None:
        """Layer 1's MLP: neuron 0 reads FLAG and writes the massive activations; neuron 1 reads
        [BOS]'s identity channel and makes [BOS]'s `bos_massive` times larger."""
        k = self.knobs
        mlp = self.model.model.layers[EMERGENCE_LAYER].mlp
        for neuron, channel, scale in ((0, FLAG, 1.0), (1, IDENTITY[0], k.bos_massive - 1)):
            mlp.gate_proj.weight[neuron, channel] = 1.0
            mlp.up_proj.weight[neuron, channel] = 1.0
            activation = _swiglu(self.flag_gain * (k.flag if channel == FLAG else k.identity))
            mlp.down_proj.weight[MASSIVE_POS, neuron] = scale * k.massive[0] / activation
            mlp.down_proj.weight[MASSIVE_NEG, neuron] = scale * k.massive[1] / activation

    def parking(self, layer: int, gain: float) -> None:
        """Every head of `layer` parks on the sinks (see the module docstring for the keys)."""
        k = self.knobs
        attention = self.model.model.layers[layer].self_attn
        s_pos, s_neg = self.sink_hat(1.0)
        massive_norm = s_pos**2 + s_neg**2
        bias, salient = gain * k.bias, gain * k.salience
        score = HEAD_DIM**-0.5
        park_dims, content_dims = _pair_dims(PARK_PAIRS), _pair_dims(CONTENT_PAIRS)
        code = CODE.stop - CODE.start
        for kv in range(KV_HEADS):
            park, reader, opposite = torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM)
            park[park_dims] = _unit(torch.randn(len(park_dims), generator=self.generator))
            reader[content_dims] = _unit(torch.randn(len(content_dims), generator=self.generator))
            opposite[content_dims] = -torch.sign(reader[content_dims]) / math.sqrt(len(content_dims))
            sink_key = k.sink_key * (park + opposite)
            key = attention.k_proj.weight[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
            key[:, MASSIVE_POS] = sink_key * s_pos / massive_norm
            key[:, MASSIVE_NEG] = sink_key * s_neg / massive_norm
            key[:, BIAS] = k.plain_logit * reader / bias
            key[:, SALIENT] = (k.salient_logit - k.plain_logit) * reader / salient
            noise = torch.zeros(HEAD_DIM, code)
            noise[content_dims] = _orthonormal_rows(len(content_dims), code, self.generator) * k.key_noise
            key[:, CODE] = noise / (gain * k.code)
            reading = reader / score  # an ordinary token scores its m
            parking = (k.margin - k.sink_key * float(reader @ opposite)) / (score * k.sink_key) * park
            value = attention.v_proj.weight[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
            value[:, BIAS] = k.junk_value * _unit(torch.randn(HEAD_DIM, generator=self.generator)) / bias
            for head in range(kv * HEADS // KV_HEADS, (kv + 1) * HEADS // KV_HEADS):
                columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                attention.q_proj.weight[columns, BIAS] = (parking + reading) / bias
                # A sink's own query parks too, so sinks collect no junk.
                attention.q_proj.weight[columns, MASSIVE_POS] = parking * s_pos / massive_norm
                attention.q_proj.weight[columns, MASSIVE_NEG] = parking * s_neg / massive_norm
                junk = torch.randn(CUR.stop - CUR.start, HEAD_DIM, generator=self.generator) / math.sqrt(HEAD_DIM)
                attention.o_proj.weight[CUR, columns] = k.junk_gain * junk

    def cancel(self, layer: int) -> None:
        """The last MLP removes the massive activations: neuron 0 reads RMSNorm(x)[MASSIVE_POS]
        (the same on every sink, which collected nothing else, and 0 elsewhere), neuron 1 reads
        [BOS]'s identity channel and removes the rest of [BOS]'s."""
        k = self.knobs
        mlp = self.model.model.layers[layer].mlp
        plain_hat, bos_hat = self.sink_hat(1.0), self.sink_hat(k.bos_massive)
        for neuron, channel in ((0, MASSIVE_POS), (1, IDENTITY[0])):
            mlp.gate_proj.weight[neuron, channel] = 1.0
            mlp.up_proj.weight[neuron, channel] = 1.0
        delimiter = _swiglu(plain_hat[0])
        bos_identity = self.root_d * k.identity / self.sink_norm(k.bos_massive)
        remainder = _swiglu(bos_hat[0]) / delimiter - k.bos_massive  # times massive: what neuron 0 leaves on [BOS]
        for channel, massive in zip((MASSIVE_POS, MASSIVE_NEG), k.massive):
            mlp.down_proj.weight[channel, 0] = -massive / delimiter
            mlp.down_proj.weight[channel, 1] = remainder * massive / _swiglu(bos_identity)

    def readout(self) -> None:
        k, stats = self.knobs, self.stats
        gain, flag_gain = self.measured_gain(self.model.model.norm)
        head = self.model.lm_head.weight
        head[:, BIAS] = self.mean_logits / (gain * k.bias)
        head[:, CUR] = self.bigram_readout / gain
        # Skip-gram: least squares from the previous-token features to the weighted PMI rows.
        features = torch.cat([self.codes * k.code, self.bigram_embedding @ self.prev_projection.T], dim=-1)
        weights = torch.where(self.ordinary, stats.frequency, torch.zeros(()))[:, None]
        gram = features.T @ (features * weights) + 1e-4 * torch.eye(features.shape[1])
        fitted = torch.linalg.solve(gram, features.T @ (k.skip_weight * stats.skip * weights))
        head[:, PREV] = fitted.T / gain
        for channel, token in zip(IDENTITY, self.flagged):
            head[:, channel] = (stats.bigram[token] - self.mean_logits * flag_gain / gain) / (flag_gain * k.identity)


def _shuffle_residual(model: LlamaForCausalLM, order: torch.Tensor) -> None:
    """Move residual channel i to order[i] in every weight that reads or writes the stream
    (RMSNorm weights are all 1, so they need no change)."""
    back = torch.argsort(order)
    body = model.model
    body.embed_tokens.weight.copy_(body.embed_tokens.weight[:, back])
    model.lm_head.weight.copy_(model.lm_head.weight[:, back])
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for reader in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            reader.weight.copy_(reader.weight[:, back])
        for writer in (attention.o_proj, mlp.down_proj):
            writer.weight.copy_(writer.weight[back])
