"""Step a: the sensitive layer l_q, measured with the recipe's quantizer.

Each block's fc2 alone is quantized and the final embedding compared with full precision. Only
fc2 is scanned: a block can be fragile for reasons a prefix and a deletion cannot touch (the
planted fixture's first block selects the sinks with a sharp attention that 4-6-bit
quantization perturbs more than any sink does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quantsink.errors import UserError
from quantsink.methods.regcache.profile import CalibrationImages, Profile, count
from quantsink.methods.regcache.trials import TrialQuantizers, cosine_distance
from quantsink.models.base import Adapter

SENSITIVE_SHARE = 0.5  # l_q: the earliest fc2 whose sensitivity reaches this share of the largest
SENSITIVITY_PASSES = 1.0  # budget of the scan, in full-precision passes over the calibration set


@dataclass
class Sensitivity:
    scores: list[float]  # [block] cosine distance to full precision with that block's fc2 quantized
    samples: int  # images the scan ran on
    passes: float  # its modelled cost, in full-precision passes over the calibration set

    def sensitive_layer(self) -> int:
        """Sinks grow over 2-3 blocks, whose fc2s are then about equally sensitive, and a
        deletion at the first of them removes the sinks from all: l_q is the earliest block
        whose fc2 costs at least SENSITIVE_SHARE of the worst one's fidelity."""
        return next(block for block, cost in enumerate(self.scores) if cost >= SENSITIVE_SHARE * max(self.scores))


def scan(adapter: Adapter, trials: TrialQuantizers, profile: Profile, images: CalibrationImages, bar: tqdm) -> Sensitivity:
    """Per block: calibrate its fc2 alone, evaluate from the block to the embedding, and advance
    the cached residual stream by that block, so the scan costs about one pass per block's tail."""
    blocks = adapter.num_blocks
    cost = sum(2 + blocks - block for block in range(blocks)) / blocks
    largest = profile.largest_token(range(blocks))
    inputs, reference = images.subset(SENSITIVITY_PASSES / cost, largest.argsort(descending=True, stable=True).tolist())
    samples = count(inputs)
    bar.total = (bar.total or 0) + blocks
    cache = [adapter.hidden_before(0, batch) for batch in inputs]
    scores = []
    names_of = {id(module): name for name, module in adapter.model.named_modules()}
    for block in range(blocks):
        names = [name for name in [names_of[id(adapter.fc2(block))]] if name in trials.targets]
        if names:
            with trials.on(names) as quantizer:
                with quantizer.calibrating(adapter.model):
                    for batch, hidden in zip(inputs, cache):
                        adapter.hidden_before(block + 1, batch, resume=(block, hidden))
                quantizer.freeze(adapter.model)
                embeddings = [adapter.run_from(block, hidden, batch) for batch, hidden in zip(inputs, cache)]
            scores.append(cosine_distance(reference, torch.cat(embeddings)))
        else:
            scores.append(0.0)
        if block + 1 < blocks:
            cache = [adapter.hidden_before(block + 1, batch, resume=(block, hidden)) for batch, hidden in zip(inputs, cache)]
        bar.update()
    if not any(scores):
        raise UserError("regcache.sensitive_layer: auto needs the fc2 Linears among quantization.targets; set it to a block index")
    return Sensitivity(scores, samples, cost * samples / images.count)
