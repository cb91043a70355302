"""The search of the `auto` fields: greedy coordinate line searches, quantizer in the loop.

From a measured starting point, each auto field in turn (k~, then tau, then prefix_start) steps
along its ladder in the direction that lowers the cosine distance to full precision, while it
does, until a round improves nothing or MAX_TRIALS quantized trials have run. A trial calibrates
and runs only the blocks its settings change, from cached hidden states.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from quantsink.methods.regcache.install import install
from quantsink.methods.regcache.options import AUTO, DELETE_LADDER, REGISTER_LADDER, RegCacheOptions, RegCacheSettings
from quantsink.methods.regcache.profile import Batch, CalibrationImages, Profile, count
from quantsink.methods.regcache.registers import Registers
from quantsink.methods.regcache.trials import TrialQuantizers, cosine_distance
from quantsink.models.base import Adapter

START_BEFORE, START_AFTER = 2, 1  # auto prefix_start: l_q - 2 .. l_q + 1
MAX_TRIALS = 12  # quantized trials of the hyperparameter search
# Budget of the trials, in full-precision passes over the whole calibration set; with the
# reference and register passes (one each) and the sensitivity scan (one) the search is planned
# at 6 passes, leaving room for what this model of its cost leaves out (quantizer arithmetic and
# observers, Python) under the 10 calibration passes.
TRIAL_PASSES = 3.0


def start_range(options: RegCacheOptions, sensitive: int, blocks: int) -> list[int]:
    """The prefix starts the search may try: the chosen one, or l_q - 2 .. l_q + 1."""
    if options.prefix_start != AUTO:
        return [options.prefix_start]
    return list(range(max(0, sensitive - START_BEFORE), min(blocks - 1, sensitive + START_AFTER) + 1))


def initial_settings(options: RegCacheOptions, sensitive: int, starts: list[int], massive: int) -> RegCacheSettings:
    """Where the search starts: tau and k~ at the worst image's count of massive tokens, the
    prefix from l_q; what the recipe fixes, as fixed."""
    return RegCacheSettings(
        sensitive_layer=sensitive,
        prefix_start=sensitive if sensitive in starts else starts[0],
        num_registers=_nearest(REGISTER_LADDER, massive) if options.num_registers == AUTO else options.num_registers,
        delete_tokens=_nearest(DELETE_LADDER, massive) if options.delete_tokens == AUTO else options.delete_tokens,
        refill=options.refill,
    )


class _ResumePoints:
    """For the trial images, the residual stream entering block `start` in full precision (what
    the observers see) and through the quantized blocks before it (what is evaluated), and the
    targets from there on; computed once per block."""

    def __init__(self, adapter: Adapter, trials: TrialQuantizers, profile: Profile, inputs: list[Batch]):
        self.adapter, self.trials, self.profile, self.inputs = adapter, trials, profile, inputs
        self._at: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {}

    @torch.no_grad()
    def at(self, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        if start not in self._at:
            adapter, targets = self.adapter, self.trials.targets
            names = adapter.block_names()[:start]
            before = [name for name in targets
                      if name in self.profile.before_blocks or any(name.startswith(block + ".") for block in names)]
            observed = [adapter.hidden_before(start, batch) for batch in self.inputs]
            evaluated = observed
            if before:
                with self.trials.on(before) as quantizer:
                    with quantizer.calibrating(adapter.model):
                        for batch in self.inputs:
                            adapter.hidden_before(start, batch)
                    quantizer.freeze(adapter.model)
                    evaluated = [adapter.hidden_before(start, batch) for batch in self.inputs]
            self._at[start] = (observed, evaluated, [name for name in targets if name not in before])
        return self._at[start]


class CoordinateSearch:
    """The search of `options`' auto fields on `adapter`'s model in place, with `registers`."""

    def __init__(self, adapter: Adapter, trials: TrialQuantizers, profile: Profile, images: CalibrationImages,
                 registers: Registers, options: RegCacheOptions, bar: tqdm):
        self.adapter, self.trials, self.profile, self.images = adapter, trials, profile, images
        self.registers, self.options, self.bar = registers, options, bar
        self.scores: dict[RegCacheSettings, float] = {}  # every quantized trial, in order
        self.inputs: list[Batch] = []  # the trial images
        self.samples = 0
        self.passes = 0.0  # modelled cost, in full passes over the calibration set

    def run(self, initial: RegCacheSettings, starts: list[int], first: int) -> RegCacheSettings:
        """The best settings found from `initial`, on a subset of the calibration images; no
        trial changes a block before `first`."""
        ladders = {
            "delete_tokens": DELETE_LADDER if self.options.delete_tokens == AUTO else None,
            "num_registers": REGISTER_LADDER if self.options.num_registers == AUTO else None,
            "prefix_start": starts if self.options.prefix_start == AUTO else None,
        }
        ladders = {field: ladder for field, ladder in ladders.items() if ladder is not None}
        if not ladders:
            return initial
        blocks = self.adapter.num_blocks
        per_trial = 2 * (blocks - first) / blocks  # observe, then evaluate, from `first` at worst
        cost = per_trial * MAX_TRIALS + 3 * first / blocks
        sensitive = initial.sensitive_layer
        counts, largest = self.profile.massive_counts(sensitive), self.profile.largest_token(range(sensitive, sensitive + 1))
        hardest = sorted(range(self.images.count), key=lambda image: (-counts[image], -largest[image]))
        self.inputs, self.reference = self.images.subset(TRIAL_PASSES / cost, hardest)
        self.resume_points = _ResumePoints(self.adapter, self.trials, self.profile, self.inputs)
        self.samples = count(self.inputs)
        self.passes = cost * self.samples / self.images.count
        self.bar.total = (self.bar.total or 0) + MAX_TRIALS
        self.bar.refresh()
        best = initial
        improved = True
        while improved and len(self.scores) < MAX_TRIALS:
            improved = False
            for field, ladder in ladders.items():
                better = self._line_search(best, field, ladder)
                improved |= better != best
                best = better
        self.bar.total = self.bar.n
        self.bar.refresh()
        return best

    def _line_search(self, best: RegCacheSettings, field: str, ladder: tuple[int, ...] | list[int]) -> RegCacheSettings:
        """From `best`, step along `ladder` in the direction that improves, while it improves."""
        origin = list(ladder).index(getattr(best, field)) if getattr(best, field) in ladder else 0
        best_score = self._score(best)
        for direction in (1, -1):
            index, moved = origin, False
            while 0 <= index + direction < len(ladder) and (
                    len(self.scores) < MAX_TRIALS or dataclasses.replace(best, **{field: ladder[index + direction]}) in self.scores):
                candidate = dataclasses.replace(best, **{field: ladder[index + direction]})
                score = self._score(candidate)
                if score >= best_score:
                    break
                best, best_score, index, moved = candidate, score, index + direction, True
            if moved:
                break
        return best

    @torch.no_grad()
    def _score(self, settings: RegCacheSettings) -> float:
        """Cosine distance to full precision of the embedding, with `settings` installed and
        quantized as the recipe says; only the blocks the settings change are run."""
        if settings in self.scores:
            return self.scores[settings]
        start = min(settings.prefix_start, settings.sensitive_layer)
        observed, evaluated, affected = self.resume_points.at(start)
        model = self.adapter.model
        with install(self.adapter, settings, self.registers), self.trials.on(affected) as quantizer:
            with quantizer.calibrating(model):
                for batch, hidden in zip(self.inputs, observed):
                    self.adapter.run_from(start, hidden, batch)
            quantizer.freeze(model)
            embeddings = [self.adapter.run_from(start, hidden, batch) for batch, hidden in zip(self.inputs, evaluated)]
        score = cosine_distance(self.reference, torch.cat(embeddings))
        self.scores[settings] = score
        self.bar.update()
        self.bar.set_postfix(best=f"{min(self.scores.values()):.2e}")
        return score


def _nearest(ladder: tuple[int, ...], value: int) -> int:
    return min(ladder, key=lambda step: (abs(step - value), step))
