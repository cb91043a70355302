"""A small Llama trained here whose attention sink, massive activation and value-state drain
emerged from training (no weight was set by hand), shipped as safetensors in sink_lm_model/:

    from quantsink.testing.sink_lm import heldout_segments, load_sink_lm, sink_lm_path, sink_statistics
    model, tokenizer = load_sink_lm()                   # or quantsink.models.resolve(str(sink_lm_path()))
    ids = heldout_segments(tokenizer, "backcopy", 16)   # or "text": held-out prose
    print(sink_statistics(model, tokenizer, ids).table())

The model: `transformers.LlamaForCausalLM`, 4 layers, hidden 128, 4 query heads on 2 kv heads
of size 32, SwiGLU 384, RoPE theta 1e4, RMSNorm, tied embeddings (1.0M parameters, 3.9 MB),
the planted fixture's word-level tokenizer (1,484 tokens, [BOS] first, "." and "\n" tokens).
`python -m quantsink.testing.train_sink_lm --out DIR` retrains it (its defaults, seed 0 on one
thread, reproduce the shipped weights bit for bit, in 1,222-1,535 s on this loaded 2-core
machine): 2,000 AdamW steps of 32 sequences of 128 tokens, half real text (the training 80% of
the bundled stdlib docstrings) and half Guo et al.'s Bigram-Backcopy task ("Active-Dormant
Attention Heads", 2024) on the same vocabulary: a bigram chain of the text's statistics where
after each of 3 trigger tokens ("the", ",", "a") the next token copies the one before it.

Why the mix: trained on the text alone (the same schedule), the model memorises the 44k tokens
of the training text and grows no sink: no head puts more than 7% of its attention on [BOS]
(its massive channel reaches 28x a token's RMS all the same). On Bigram-Backcopy a head has
work only after a trigger, and Guo et al. find such heads dormant elsewhere, parked on [BOS].

What emerged (`sink_statistics`, 16 held-out sequences of each kind; sink_lm_model/README.md has the
full tables):
* Attention sink, on Bigram-Backcopy: in blocks 2 and 3 every head puts 75-83% of its attention
  on [BOS] (mean 0.81 and 0.77), under 1% on any delimiter; blocks 0 and 1 are active heads
  (under 10% on [BOS]). On held-out prose no head parks: at most 7% on [BOS], 1% on the first
  delimiter. The sink is [BOS] alone, unlike Llama-2's [BOS] plus first delimiter.
* Massive activation: channel 82 holds the largest |h| of blocks 0-2, on [BOS], 28-52x the
  median token RMS (Llama-2: ~1e3); [BOS]'s |h| is 4-9x the median token's. Block 3 (the last)
  removes it (5-6x), as LLMs' last layers do.
* Value-state drain: [BOS]'s value vectors are 0.22-0.37 of an ordinary token's in every layer.
* KVSink: its profile finds channel 82 at block 0 (36.7x on the calibration prose, under
  `massive_ratio` 100, so it warns) and, with `min_score: 0`, predicts [BOS] in every row plus
  the four next-strongest tokens; 2-bit per-channel keys (groups of 16, no residual window,
  chunks of 16): KL on Bigram-Backcopy none 0.00620, PFN-1 0.00242, PFN-5 0.00156, KVSink-5
  0.00156 (0.0015571 vs 0.0015638); on prose none 0.181, PFN-1 0.086, PFN-5 0.093, KVSink-5 0.090.
  With one sink, KVSink can only tie PFN: both keep [BOS].
* As a language model of held-out prose it is poor (perplexity 835 under full precision; the
  planted fixture's unigram gets 162: it memorised its training text). On Bigram-Backcopy its
  perplexity is 21.4 and it predicts 99% of the copied tokens after a trigger.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterator, Literal

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from quantsink.errors import UserError
from quantsink.models import resolve
from quantsink.testing.planted_llm import DELIMITERS, planted_segments
from quantsink.testing.train_sink_lm import SEQ_LEN, BigramBackcopy, token_stream

FOLDER = "sink_lm_model"
# Held-out Bigram-Backcopy sequences are drawn with this seed (training draws from seed 0's stream).
HELDOUT_SEED = 1234


def sink_lm_path() -> Path:
    """The shipped model folder (config.json, model.safetensors, tokenizer files)."""
    return Path(str(files("quantsink.testing") / FOLDER))


get_model_path = sink_lm_path  # the offline-package interface the model catalog reads ("sink-lm")


def load_sink_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The shipped model (eval mode, float32) and its tokenizer, through the hf-llama adapter."""
    adapter = resolve(str(sink_lm_path()))
    return adapter.model.eval(), adapter.processor


def heldout_segments(tokenizer: PreTrainedTokenizerFast, kind: Literal["text", "backcopy"], count: int) -> torch.Tensor:
    """(count, 128) token ids, [BOS] first: `text`, the held-out bundled prose (as the planted
    fixture splits it); `backcopy`, fresh Bigram-Backcopy sequences (quantsink.testing.train_sink_lm)."""
    if kind == "text":
        return planted_segments(tokenizer, "heldout", SEQ_LEN)[:count]
    if kind == "backcopy":
        task = BigramBackcopy(token_stream(tokenizer), tokenizer)
        return task.sample(tokenizer.bos_token_id, count, torch.Generator().manual_seed(HELDOUT_SEED))
    raise UserError(f"kind must be 'text' or 'backcopy', got {kind!r}")


@dataclass(frozen=True)
class SinkStatistics:
    """What `sink_statistics` measured; per layer (0-based decoder blocks) and, where two
    indices, per layer and query head. Attention shares are the mean over every query that
    comes after its row's first delimiter (so all three token kinds are visible to it).

    bos_attention, first_delimiter_attention: the attention mass on [BOS] and on the row's
        first "." or "\\n"; later_delimiter_attention: on all its later delimiters together.
    massive_channel, massive_ratio: per block output, the channel with the largest |h| over the
        real tokens, and that peak over the typical token scale (the median token RMS over
        channels; kvsink's profiler uses the same measure), with `massive_token`: the kind of
        token holding it ("bos", "first_delimiter", "delimiter" or "ordinary").
    bos_norm_ratio, first_delimiter_norm_ratio: |h| of that token over the median token |h|.
    bos_value_ratio, first_delimiter_value_ratio: the token's value-state norm (v_proj output,
        averaged over kv heads) over the median ordinary token's: value-state drain when << 1.
    """

    bos_attention: torch.Tensor  # (layers, heads)
    first_delimiter_attention: torch.Tensor
    later_delimiter_attention: torch.Tensor
    massive_channel: list[int]
    massive_ratio: list[float]
    massive_token: list[str]
    bos_norm_ratio: list[float]
    first_delimiter_norm_ratio: list[float]
    bos_value_ratio: list[float]
    first_delimiter_value_ratio: list[float]

    def table(self) -> str:
        """A markdown table, one line per layer (attention shares averaged over heads, with the
        smallest head's in brackets)."""
        lines = [
            "| layer | attn on [BOS] | attn on 1st delim | attn on later delims | massive channel | ratio | held by "
            "| |h| [BOS] / median | |h| 1st delim / median | |v| [BOS] / median | |v| 1st delim / median |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for layer in range(len(self.massive_channel)):
            def share(values: torch.Tensor) -> str:
                return f"{float(values[layer].mean()):.2f} ({float(values[layer].min()):.2f})"

            lines.append(
                f"| {layer} | {share(self.bos_attention)} | {share(self.first_delimiter_attention)} | "
                f"{share(self.later_delimiter_attention)} | {self.massive_channel[layer]} | {self.massive_ratio[layer]:.0f} | "
                f"{self.massive_token[layer]} | {self.bos_norm_ratio[layer]:.1f} | {self.first_delimiter_norm_ratio[layer]:.1f} | "
                f"{self.bos_value_ratio[layer]:.2f} | {self.first_delimiter_value_ratio[layer]:.2f} |"
            )
        return "\n".join(lines)


def delimiter_masks(ids: torch.Tensor, tokenizer: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """(first delimiter, later delimiters) boolean masks of `ids` (n, length), [BOS] excluded."""
    delimiters = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(list(DELIMITERS))))
    first = delimiters & (delimiters.cumsum(-1) == 1)
    return first, delimiters & ~first


def attention_mass(model: LlamaForCausalLM, ids: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(layers, heads): per head, the attention probability on the positions in `keys` (n, length)
    summed over them, averaged over the queries in `queries` (n, length)."""
    with eager_attention(model), torch.no_grad():
        return _mass(model(input_ids=ids, output_attentions=True).attentions, keys, queries)


def _mass(attentions: tuple[torch.Tensor, ...], keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    weights = queries.float()
    return torch.stack([
        (probabilities * keys[:, None, None, :]).sum(-1).mul(weights[:, None]).sum((0, 2)) / weights.sum()
        for probabilities in attentions
    ])


@contextlib.contextmanager
def eager_attention(model: LlamaForCausalLM) -> Iterator[None]:
    """Run `model` with transformers' eager attention, the one that returns probabilities."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def sink_statistics(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor) -> SinkStatistics:
    """Measure the attention sinks, massive activations and value-state drain of `model` on `ids`
    (n, length): unpadded rows that start with [BOS] and hold a delimiter (see SinkStatistics)."""
    first, later = delimiter_masks(ids, tokenizer)
    if not bool(first.any(-1).all()):
        raise UserError("sink_statistics needs a '.' or '\\n' in every row: pass longer rows of real text")
    bos = torch.zeros_like(first)
    bos[:, 0] = True
    queries = (first.cumsum(-1) > 0) & ~first
    values: list[torch.Tensor] = []
    handles = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: values.append(out.detach()))
               for layer in model.model.layers]
    try:
        with eager_attention(model), torch.no_grad():
            output = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = output.hidden_states[1:]
    if len(values) != len(hidden):
        raise RuntimeError(f"sink_statistics saw the values of {len(values)} of {len(hidden)} layers: its v_proj hooks did not run")
    kinds = torch.full(ids.shape, 3)
    kinds[later] = 2
    kinds[first] = 1
    kinds[bos] = 0
    names = ("bos", "first_delimiter", "delimiter", "ordinary")
    ordinary = kinds == 3
    channel, ratio, token, bos_norm, first_norm, bos_value, first_value = ([] for _ in range(7))
    for states, value in zip(hidden, values):
        states = states.float()
        scale = states.pow(2).mean(-1).sqrt().median()
        peak = states.abs().amax(dim=(0, 1))
        top = int(peak.argmax())
        channel.append(top)
        ratio.append(float(peak[top] / scale))
        token.append(names[int(kinds.flatten()[states[..., top].abs().flatten().argmax()])])
        norms = states.norm(dim=-1)
        bos_norm.append(float(norms[bos].mean() / norms.median()))
        first_norm.append(float(norms[first].mean() / norms.median()))
        heads = value.float().reshape(*ids.shape, model.config.num_key_value_heads, -1).norm(dim=-1).mean(-1)
        typical = heads[ordinary].median()
        bos_value.append(float(heads[bos].mean() / typical))
        first_value.append(float(heads[first].mean() / typical))
    return SinkStatistics(
        bos_attention=_mass(output.attentions, bos, queries),
        first_delimiter_attention=_mass(output.attentions, first, queries),
        later_delimiter_attention=_mass(output.attentions, later, queries),
        massive_channel=channel,
        massive_ratio=ratio,
        massive_token=token,
        bos_norm_ratio=bos_norm,
        first_delimiter_norm_ratio=first_norm,
        bos_value_ratio=bos_value,
        first_delimiter_value_ratio=first_value,
    )
