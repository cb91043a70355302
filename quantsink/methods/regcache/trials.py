"""Trial quantization: the recipe's quantizer restricted to a few Linears, and how a trial scores."""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterator

import torch

from quantsink.evaluate import fidelity
from quantsink.methods.base import MethodContext
from quantsink.quantizers.base import Quantizer, target_linears

# The search minimises 1 - the validation images' mean centred cosine to full precision. Plain
# cosine barely moves (embeddings share a large common component), relative L2 also charges a
# harmless global rescaling, and rank agreement is a step function of a few dozen neighbour sets,
# too coarse to rank nearby settings; the report gives all of them.
CRITERION = "centered_cosine_mean"


class TrialQuantizers:
    """Quantizers of the recipe's backend and settings for chosen Linears of the model, which
    stays in place: each trial works on copies of its Linears, put back afterwards."""

    def __init__(self, context: MethodContext):
        self.model = context.adapter.model
        self.config = context.recipe.quantization
        self.quantizer_type = type(context.make_quantizer())
        self.targets = list(target_linears(self.model, self.config))  # the names the recipe quantizes
        self._originals: dict[str, torch.nn.Module] = {}

    @contextlib.contextmanager
    def on(self, names: list[str], weights: bool = True) -> Iterator[Quantizer]:
        """A quantizer for exactly `names` (their inputs only when `weights` is False), prepared
        on copies of those Linears; the originals are put back on exit."""
        originals = {name: self.model.get_submodule(name) for name in names}
        self._originals = originals
        try:
            for name, module in originals.items():
                self.model.set_submodule(name, copy.deepcopy(module))
            update = {"targets": ["re:(?:" + "|".join(re.escape(name) for name in names) + ")$"], "ignore": []}
            if not weights:
                update["weights"] = None
            quantizer = self.quantizer_type(self.config.model_copy(update=update))
            quantizer.prepare(self.model)
            yield quantizer
        finally:
            self._originals = {}
            for name, module in originals.items():
                self.model.set_submodule(name, module)

    @contextlib.contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Inside `on`, after freezing: every Linear of that trial but `name` back in full
        precision, so that one calibration serves a scan of its Linears one at a time."""
        others = {other: self.model.get_submodule(other) for other in self._originals if other != name}
        try:
            for other in others:
                self.model.set_submodule(other, self._originals[other])
            yield
        finally:
            for other, module in others.items():
                self.model.set_submodule(other, module)


def damage(reference: torch.Tensor, embeddings: torch.Tensor) -> tuple[float, dict[str, float]]:
    """A trial's score (lower is better: 1 - the CRITERION) and its whole fidelity."""
    scores = fidelity(reference, embeddings)
    return 1.0 - scores[CRITERION], scores
