"""Train the small Llama shipped in quantsink/testing/sink_lm_model/, whose attention sink, massive
activation and value-state drain come from training alone (quantsink.testing.sink_lm says what
emerged and how it was measured).

    OMP_NUM_THREADS=1 python -m quantsink.testing.train_sink_lm --out DIR

A `transformers.LlamaForCausalLM` (RMSNorm, RoPE, GQA, SwiGLU; 4 layers, hidden 128) from random
initial weights, in the word-level tokenizer of the planted fixture (quantsink.testing.
planted_llm: [BOS] first, "." and "\\n" are tokens), trained with AdamW (no dropout, weight decay
0.1, cosine schedule) on batches that are half real text and half Guo et al.'s Bigram-Backcopy
task ("Active-Dormant Attention Heads", 2024):
* text: [BOS], then 127 consecutive tokens from a random offset of the training 80% of the
  bundled prose (stdlib docstrings, `calibration/text.txt`);
* Bigram-Backcopy (`BigramBackcopy`): [BOS], then a Markov chain of the same text's bigram
  frequencies, except that after a trigger token the next one copies the token before it.
Text alone does not grow a sink at this size and budget (sink_lm's docstring has the numbers);
the task gives heads that have work only after triggers and, as Guo et al. report, park on
[BOS] elsewhere. The defaults are the shipped weights: the same seed, `--threads 1` and library
versions (torch 2.14.1, transformers 5.23.0) reproduce them bit for bit; more threads may change
the last bits. 2,000 steps took 20 and 26 minutes (1,222 s and 1,535 s) on one thread of this
2-core machine while other jobs kept it loaded (load average 4-5).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantsink import io
from quantsink.testing.planted_llm import DELIMITERS, build_tokenizer, planted_text

log = logging.getLogger(__name__)

HIDDEN, INTERMEDIATE, LAYERS = 128, 384, 4
HEADS, KV_HEADS = 4, 2
SEQ_LEN = 128
TRIGGERS = 3
# the shipped weights' schedule (module docstring)
STEPS, BATCH, LR, WEIGHT_DECAY, BACKCOPY = 2000, 32, 3e-3, 0.1, 0.5


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def token_stream(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    return torch.tensor(tokenizer(planted_text("train"), add_special_tokens=False)["input_ids"], dtype=torch.long)


def sample_windows(stream: torch.Tensor, bos: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, SEQ_LEN): [BOS] then SEQ_LEN - 1 consecutive tokens from random offsets."""
    starts = torch.randint(0, len(stream) - SEQ_LEN + 1, (batch,), generator=generator)
    body = torch.stack([stream[start : start + SEQ_LEN - 1] for start in starts.tolist()])
    return torch.cat([torch.full((batch, 1), bos), body], dim=1)


class BigramBackcopy:
    """Guo et al.'s Bigram-Backcopy task ("Active-Dormant Attention Heads", 2024) over this
    vocabulary: [BOS], then a Markov chain whose transitions are the training text's bigram
    frequencies, except that after a trigger token the next token copies the one before the
    trigger. Triggers are the `triggers` most frequent tokens other than delimiters and [UNK]
    (for the shipped model: "the", "," and "a")."""

    def __init__(self, stream: torch.Tensor, tokenizer: PreTrainedTokenizerFast, triggers: int = TRIGGERS):
        vocab = len(tokenizer)
        counts = torch.bincount(stream[:-1] * vocab + stream[1:], minlength=vocab * vocab).reshape(vocab, vocab).double()
        self.transitions = (counts + 1e-3).div(counts.sum(-1, keepdim=True) + 1e-3 * vocab)
        frequency = torch.bincount(stream, minlength=vocab)
        excluded = tokenizer.convert_tokens_to_ids(list(DELIMITERS) + [tokenizer.unk_token])
        frequency[excluded] = 0
        self.triggers = frequency.argsort(descending=True)[:triggers]
        self.start = frequency.double() / frequency.sum()
        self.vocab = vocab

    def sample(self, bos: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        ids = torch.empty(batch, SEQ_LEN, dtype=torch.long)
        ids[:, 0] = bos
        ids[:, 1] = torch.multinomial(self.start, batch, replacement=True, generator=generator)
        is_trigger = torch.zeros(self.vocab, dtype=torch.bool)
        is_trigger[self.triggers] = True
        for position in range(2, SEQ_LEN):
            current = ids[:, position - 1]
            drawn = torch.multinomial(self.transitions[current], 1, generator=generator).squeeze(-1)
            ids[:, position] = torch.where(is_trigger[current] & (position > 2), ids[:, position - 2], drawn)
        return ids


def train(steps: int = STEPS, batch: int = BATCH, lr: float = LR, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
          backcopy: float = BACKCOPY, triggers: int = TRIGGERS, progress: bool = True
          ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The trained model (eval mode) and its tokenizer; `backcopy` is the share of each batch
    drawn from the Bigram-Backcopy task, the rest is text."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed).train()
    stream = token_stream(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    task = BigramBackcopy(stream, tokenizer, triggers)
    synthetic = round(batch * backcopy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(range(steps), desc="train sink lm", disable=not progress)
    for step in bar:
        ids = sample_windows(stream, tokenizer.bos_token_id, batch - synthetic, generator)
        if synthetic:
            ids = torch.cat([ids, task.sample(tokenizer.bos_token_id, synthetic, generator)])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    parser.add_argument("--backcopy", type=float, default=BACKCOPY, help="share of each batch from the Bigram-Backcopy task")
    parser.add_argument("--triggers", type=int, default=TRIGGERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = train(args.steps, args.batch, args.lr, args.weight_decay, args.seed, args.backcopy, args.triggers,
                             not args.no_progress)
    with io.atomic_output_dir(args.out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    log.info("trained %d steps in %.0f s on %d threads -> %s", args.steps, time.perf_counter() - started, args.threads, Path(args.out))


if __name__ == "__main__":
    main()
