"""Trial quantization: the recipe's quantizer restricted to a few Linears, and how a trial scores."""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterator

import torch

from quantsink.methods.base import MethodContext
from quantsink.quantizers.base import Quantizer, target_linears


class TrialQuantizers:
    """Quantizers of the recipe's backend and settings for chosen Linears of the model, which
    stays in place: each trial works on copies of its Linears, put back afterwards."""

    def __init__(self, context: MethodContext):
        self.model = context.adapter.model
        self.config = context.recipe.quantization
        self.quantizer_type = type(context.make_quantizer())
        self.targets = list(target_linears(self.model, self.config))  # the names the recipe quantizes

    @contextlib.contextmanager
    def on(self, names: list[str]) -> Iterator[Quantizer]:
        """A quantizer for exactly `names`, prepared on copies of those Linears; the originals
        are put back on exit."""
        originals = {name: self.model.get_submodule(name) for name in names}
        try:
            for name, module in originals.items():
                self.model.set_submodule(name, copy.deepcopy(module))
            config = self.config.model_copy(
                update={"targets": ["re:(?:" + "|".join(re.escape(name) for name in names) + ")$"], "ignore": []}
            )
            quantizer = self.quantizer_type(config)
            quantizer.prepare(self.model)
            yield quantizer
        finally:
            for name, module in originals.items():
                self.model.set_submodule(name, module)


def cosine_distance(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """How far a trial's embeddings are from full precision: 1 - their mean cosine similarity."""
    return 1.0 - torch.nn.functional.cosine_similarity(reference.double(), embeddings.double(), dim=-1).mean().item()
