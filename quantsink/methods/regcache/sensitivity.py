"""Step a: the sensitive layer l_q, measured with the recipe's activation quantizer.

Every targeted Linear of every block (q/k/v, out, fc1, fc2) has its input quantized alone, as
the recipe quantizes activations, and the final embedding of build images is compared with full
precision by the search's criterion (trials.CRITERION). Weights stay in full precision here:
RegCache changes activations only, so a Linear's weight error is the same whatever it does, and
a block whose weights are fragile (the planted fixture's sharp selection head at 4 bits) is not
one a prefix or a deletion can help. For the same reason l_q is the block of the most sensitive
Linear among those whose input holds massive activations (its largest entry at least
MASSIVE_RATIO times its median token's l_inf norm, as profile.py counts massive tokens): a Linear
fragile without them (the planted fixture's block-0 selection head, whose output decides which
patches become sinks) is fragile for a reason RegCache cannot touch. Linears within TIE of the
most sensitive one are tied, and the tie goes to the largest outlier ratio. When no input holds
massive activations the most sensitive Linear overall is taken (RegCache is then unlikely to
help, and the search falls back to naive). The report lists the overall worst and the tied ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quantsink.errors import UserError
from quantsink.methods.regcache.profile import MASSIVE_RATIO, CalibrationImages, Profile, count
from quantsink.methods.regcache.trials import TrialQuantizers, damage
from quantsink.models.base import Adapter

TIE = 0.1  # Linears whose damage is within this share of the worst one's are tied
SENSITIVITY_PASSES = 1.5  # budget of the scan, in full-precision passes over the calibration set
SENSITIVITY_MIN_IMAGES = 4  # the hardest ones: what sets static scales, so what ranks the Linears


@dataclass
class Sensitivity:
    scores: dict[str, float]  # per targeted Linear in a block: damage with its input quantized alone
    blocks: dict[str, int]  # the block each of them is in
    ratios: dict[str, float]  # its input's largest entry over its median token's l_inf norm
    samples: int  # images the scan ran on
    passes: float  # its modelled cost, in full-precision passes over the calibration set

    def eligible(self) -> list[str]:
        """The Linears whose input holds massive activations, or all when none does."""
        massive = [name for name in self.scores if self.ratios[name] >= MASSIVE_RATIO]
        return massive or list(self.scores)

    def tied(self) -> list[str]:
        eligible = self.eligible()
        worst = max(self.scores[name] for name in eligible)
        return sorted((name for name in eligible if self.scores[name] >= (1 - TIE) * worst), key=lambda name: -self.scores[name])

    def most_sensitive(self) -> str:
        return max(self.tied(), key=lambda name: self.ratios[name])

    def sensitive_layer(self) -> int:
        return self.blocks[self.most_sensitive()]

    def explain(self) -> dict:
        chosen = self.most_sensitive()
        return {
            "linear": chosen,
            "block": self.blocks[chosen],
            "rule": (f"the most sensitive Linear whose input's largest entry is >= {MASSIVE_RATIO:g}x its median token's "
                     f"l_inf norm (any Linear when none is); within {TIE:.0%} of it, the largest such ratio"),
            "most_sensitive_overall": max(self.scores, key=self.scores.get),
            "tied": [{"linear": name, "damage": self.scores[name], "input_outlier_ratio": self.ratios[name]}
                     for name in self.tied()],
            "scores": self.scores,
        }


@torch.no_grad()
def scan(adapter: Adapter, trials: TrialQuantizers, profile: Profile, images: CalibrationImages, build: list[int],
         bar: tqdm) -> Sensitivity:
    """Per block: calibrate the input observers of its targeted Linears together (they see full
    precision while calibrating), then evaluate each one alone from the block to the embedding,
    and advance the cached residual stream by that block."""
    if trials.config.activations is None:
        raise UserError("regcache.sensitive_layer: auto measures activation quantization, and the recipe quantizes "
                        "no activations (RegCache cannot help weight-only quantization): remove regcache")
    blocks = adapter.num_blocks
    block_names = adapter.block_names()
    linears = {block: [name for name in trials.targets if name.startswith(block_names[block] + ".")] for block in range(blocks)}
    per_image = sum(2 + len(names) * (blocks - block) for block, names in linears.items())  # block runs
    if not any(linears.values()):
        raise UserError("regcache.sensitive_layer: auto needs Linears of the blocks among quantization.targets; set it to a block index")
    largest = profile.largest_token(range(blocks))
    hardest = sorted(build, key=lambda image: -largest[image])
    chosen = images.subset(int(SENSITIVITY_PASSES * blocks * images.count / per_image), hardest, SENSITIVITY_MIN_IMAGES)
    inputs, reference = images.batches_of(chosen), images.embeddings[chosen]
    bar.total = (bar.total or 0) + blocks
    cache = [adapter.hidden_before(0, batch) for batch in inputs]
    scores: dict[str, float] = {}
    located: dict[str, int] = {}
    for block in range(blocks):
        if linears[block]:
            with trials.on(linears[block], weights=False) as quantizer:
                with quantizer.calibrating(adapter.model):
                    for batch, hidden in zip(inputs, cache):
                        adapter.hidden_before(block + 1, batch, resume=(block, hidden))
                quantizer.freeze(adapter.model)
                for name in linears[block]:
                    with trials.only(name):
                        embeddings = [adapter.run_from(block, hidden, batch) for batch, hidden in zip(inputs, cache)]
                    scores[name], located[name] = damage(reference, torch.cat(embeddings))[0], block
        if block + 1 < blocks:
            cache = [adapter.hidden_before(block + 1, batch, resume=(block, hidden)) for batch, hidden in zip(inputs, cache)]
        bar.update()
    ratios = {name: profile.input_outlier_ratio(name) for name in scores}
    return Sensitivity(scores, located, ratios, count(inputs), per_image * count(inputs) / (blocks * images.count))
