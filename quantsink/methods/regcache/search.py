"""The joint search of the `auto` fields: budgeted coordinate descent, quantizer in the loop,
judged on validation images that neither build the registers nor set any trial's scales.

The space holds the null setting and each part alone: tau and k~ each include 0 ("off"), so the
four variants naive (tau = k~ = 0), prefix-only, delete-only and both are each searched on their
own, from their own starting point, and the chosen settings are the best trial of all of them.
Since naive is one of the trials, the search never ships anything worse than naive on the
validation images. Within a variant, coordinate descent sweeps one field at a time over its
ladder (every other step, then the neighbours of the best), until a round improves nothing or
the variant's share of the budget is spent. A trial calibrates and runs only the blocks its
settings change, from cached hidden states.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from tqdm.auto import tqdm

from quantsink.methods.regcache.install import install
from quantsink.methods.regcache.options import AUTO, DELETE_LADDER, REGISTER_LADDER, RegCacheOptions, RegCacheSettings
from quantsink.methods.regcache.profile import Batch, CalibrationImages, Profile, count
from quantsink.methods.regcache.registers import Registers
from quantsink.methods.regcache.trials import TrialQuantizers, damage
from quantsink.models.base import Adapter

START_BEFORE = 3  # auto prefix_start: l_q - 3 .. l_q
VARIANTS = ("naive", "delete-only", "prefix-only", "both")
# The trials' budget, in full-precision passes over the calibration set, and each variant's share
# (what one leaves unspent passes to the next). With the reference pass, the registers and the
# sensitivity scan the method is planned at about 8 passes, under the 10 it may cost.
TRIAL_PASSES = 4.5
SHARES = {"naive": 0.05, "delete-only": 0.2, "prefix-only": 0.35, "both": 0.4}
CALIBRATING_IMAGES = 8  # build images that set a trial's scales: the hardest first


def start_range(options: RegCacheOptions, sensitive: int, prefix_blocks: str) -> list[int]:
    """The prefix starts the search may try: the chosen one, the sensitive block alone for
    `sensitive_only`, or l_q - 3 .. l_q (the paper's "a few blocks before l_q")."""
    if prefix_blocks == "sensitive_only":
        return [sensitive]
    if options.prefix_start != AUTO:
        return [options.prefix_start]
    return list(range(max(0, sensitive - START_BEFORE), sensitive + 1))


class _ResumePoints:
    """Per block `start`: the residual stream entering it in full precision for the calibrating
    images (what the observers see) and through the quantized blocks before it for the
    validation images (what is judged), and the targeted Linears from there on; once per block."""

    def __init__(self, adapter: Adapter, trials: TrialQuantizers, profile: Profile, calibrating: list[Batch],
                 validation: list[Batch]):
        self.adapter, self.trials, self.profile = adapter, trials, profile
        self.calibrating, self.validation = calibrating, validation
        self._at: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {}
        self.block_images = 0  # what computing them cost

    @torch.no_grad()
    def at(self, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        if start not in self._at:
            adapter, targets = self.adapter, self.trials.targets
            names = adapter.block_names()[:start]
            before = [name for name in targets
                      if name in self.profile.before_blocks or any(name.startswith(block + ".") for block in names)]
            observed = [adapter.hidden_before(start, batch) for batch in self.calibrating]
            if before:
                with self.trials.on(before) as quantizer:
                    with quantizer.calibrating(adapter.model):
                        for batch in self.calibrating:
                            adapter.hidden_before(start, batch)
                    quantizer.freeze(adapter.model)
                    evaluated = [adapter.hidden_before(start, batch) for batch in self.validation]
            else:
                evaluated = [adapter.hidden_before(start, batch) for batch in self.validation]
            self.block_images += start * ((2 if before else 1) * count(self.calibrating) + count(self.validation))
            self._at[start] = (observed, evaluated, [name for name in targets if name not in before])
        return self._at[start]


@dataclasses.dataclass
class Trial:
    settings: RegCacheSettings
    damage: float  # 1 - the validation images' CRITERION
    fidelity: dict[str, float]  # on the validation images


class JointSearch:
    """The search of `options`' auto fields on `adapter`'s model in place, with `registers`."""

    def __init__(self, adapter: Adapter, trials: TrialQuantizers, profile: Profile, images: CalibrationImages,
                 build: list[int], validation: list[int], registers: Registers, options: RegCacheOptions, bar: tqdm):
        self.adapter, self.trials, self.profile, self.images = adapter, trials, profile, images
        self.registers, self.options, self.bar = registers, options, bar
        self.build, self.validation = build, validation
        self.trials_run: dict[RegCacheSettings, Trial] = {}  # every quantized trial, in order
        self.best: dict[str, Trial] = {}  # each variant's best trial
        self.inputs: list[Batch] = []  # the images that set a trial's scales
        self.block_images = 0  # what the trials cost, in block runs of one image

    def passes(self) -> float:
        """The cost so far, in full-precision passes over the calibration set."""
        blocks = self.adapter.num_blocks
        return (self.block_images + self.resume_points.block_images) / (blocks * self.images.count)

    def run(self, sensitive: int, starts: list[int], massive: int, prefix_blocks: str) -> RegCacheSettings:
        """The best settings of all variants' trials; each variant starts where the worst
        calibration image's count of massive tokens at l_q says, or where the variants before it
        ended."""
        options = self.options
        counts, largest = self.profile.massive_counts(sensitive), self.profile.largest_token(range(sensitive, sensitive + 1))
        hardest = sorted(self.build, key=lambda image: (-counts[image], -largest[image]))
        calibrating = self.images.subset(CALIBRATING_IMAGES, hardest)
        self.inputs = self.images.batches_of(calibrating)
        self.validation_inputs = self.images.batches_of(self.validation)
        self.reference = self.images.embeddings[self.validation]
        self.resume_points = _ResumePoints(self.adapter, self.trials, self.profile, self.inputs, self.validation_inputs)
        ladders = {
            "prefix_start": starts,
            "num_registers": REGISTER_LADDER if options.num_registers == AUTO else (options.num_registers,),
            "delete_tokens": DELETE_LADDER if options.delete_tokens == AUTO else (options.delete_tokens,),
        }
        prefix_on = [tau for tau in ladders["num_registers"] if tau] if options.num_registers != 0 else []
        delete_on = [k for k in ladders["delete_tokens"] if k] if options.delete_tokens != 0 else []
        allowed = {
            "naive": options.num_registers in (AUTO, 0) and options.delete_tokens in (AUTO, 0),
            "delete-only": bool(delete_on) and options.num_registers in (AUTO, 0),
            "prefix-only": bool(prefix_on) and options.delete_tokens in (AUTO, 0),
            "both": bool(prefix_on) and bool(delete_on),
        }
        base = RegCacheSettings(sensitive_layer=sensitive, prefix_start=starts[-1], num_registers=0, delete_tokens=0,
                                refill=options.refill, prefix_blocks=prefix_blocks)
        first_prefix = starts[-2] if len(starts) > 1 else starts[0]  # one block before l_q
        initial = {
            "naive": base,
            "delete-only": dataclasses.replace(base, delete_tokens=_nearest(delete_on, massive) if delete_on else 0),
            "prefix-only": dataclasses.replace(base, prefix_start=first_prefix,
                                               num_registers=_nearest(prefix_on, massive) if prefix_on else 0),
        }
        free = {
            "naive": {},
            "delete-only": {"delete_tokens": delete_on},
            "prefix-only": {"num_registers": prefix_on, "prefix_start": starts},
            "both": {"delete_tokens": delete_on, "num_registers": prefix_on, "prefix_start": starts},
        }
        self.bar.refresh()
        share = 0.0
        for variant in VARIANTS:
            share += SHARES[variant]  # cumulative, so what one variant leaves passes to the next
            if not allowed[variant]:
                continue
            if variant == "both":
                prefix = self.best["prefix-only"].settings if "prefix-only" in self.best else initial["prefix-only"]
                deletion = self.best["delete-only"].settings if "delete-only" in self.best else initial["delete-only"]
                initial["both"] = dataclasses.replace(prefix, delete_tokens=deletion.delete_tokens)
            self.best[variant] = self._descend(initial[variant], free[variant], share * TRIAL_PASSES)
        self.bar.total = self.bar.n
        self.bar.refresh()
        return min(self.trials_run.values(), key=lambda trial: trial.damage).settings

    def _descend(self, start: RegCacheSettings, fields: dict[str, Sequence[int]], limit: float) -> Trial:
        best = self._trial(start)
        improved = True
        while improved and self.passes() < limit:
            improved = False
            for field, ladder in fields.items():
                if len(ladder) < 2 or self.passes() >= limit:
                    continue
                swept = self._sweep(best, field, list(ladder), limit)
                improved |= swept.damage < best.damage
                best = min(best, swept, key=lambda trial: trial.damage)
        return best

    def _sweep(self, best: Trial, field: str, ladder: list[int], limit: float) -> Trial:
        """`best` with `field` at every other step of `ladder` (and its last), then at the
        neighbours of the best of those."""
        coarse = sorted(set(ladder[::2]) | {ladder[-1]})
        for value in coarse:
            if self.passes() >= limit:
                return best
            best = min(best, self._trial(dataclasses.replace(best.settings, **{field: value})), key=lambda trial: trial.damage)
        position = ladder.index(getattr(best.settings, field))
        for neighbour in (position - 1, position + 1):
            if 0 <= neighbour < len(ladder) and self.passes() < limit:
                trial = self._trial(dataclasses.replace(best.settings, **{field: ladder[neighbour]}))
                best = min(best, trial, key=lambda trial: trial.damage)
        return best

    @torch.no_grad()
    def _trial(self, settings: RegCacheSettings) -> Trial:
        """`settings` installed and quantized as the recipe says, calibrated on the calibrating
        images and judged on the validation images; only the blocks the settings change run."""
        if settings in self.trials_run:
            return self.trials_run[settings]
        start = settings.first_changed_block()
        observed, evaluated, affected = self.resume_points.at(start)
        model = self.adapter.model
        with install(self.adapter, settings, self.registers), self.trials.on(affected) as quantizer:
            with quantizer.calibrating(model):
                for batch, hidden in zip(self.inputs, observed):
                    self.adapter.run_from(start, hidden, batch)
            quantizer.freeze(model)
            embeddings = [self.adapter.run_from(start, hidden, batch) for batch, hidden in zip(self.validation_inputs, evaluated)]
        self.block_images += (self.adapter.num_blocks - start) * (count(self.inputs) + count(self.validation_inputs))
        score, scores = damage(self.reference, torch.cat(embeddings))
        trial = self.trials_run[settings] = Trial(settings, score, scores)
        self.bar.update()
        self.bar.set_postfix(best=f"{min(trial.damage for trial in self.trials_run.values()):.2e}")
        return trial


def _nearest(ladder: Sequence[int], value: int) -> int:
    return min(ladder, key=lambda step: (abs(step - value), step))
