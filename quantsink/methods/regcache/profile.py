"""The reference pass: what one full-precision pass over the calibration set shows, and the
calibration images addressed by index, so that the later stages run on chosen subsets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantsink import distributed
from quantsink.errors import UserError
from quantsink.models.base import Adapter, hidden_states_of
from quantsink.recipe import ExecutionConfig
from quantsink.sequential import IN_MEMORY, forward_passes

Batch = dict[str, torch.Tensor]

# The initial k~ counts, per image, the tokens at l_q's output whose l_inf norm exceeds this many
# times the median token's: the massive tokens the deletion is meant for.
MASSIVE_RATIO = 10.0
MIN_SEARCH_SAMPLES = 8


def batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def count(batches: list[Batch]) -> int:
    return sum(batch_size(batch) for batch in batches)


@dataclass
class Profile:
    """What one full-precision pass over the calibration set shows."""

    embeddings: torch.Tensor  # (samples, dim)
    token_linf: list[torch.Tensor]  # [block] (samples, tokens) l_inf norm at the block's output
    deletable: torch.Tensor  # (samples, tokens): neither leading special token nor padding
    fc2_input_max: list[float]  # [block] largest |x| entering fc2
    before_blocks: set[str]  # targeted Linears outside the blocks that run before block 0
    input_max: dict[str, float]  # per targeted Linear in a block: the largest |x| entering it
    input_median_token: dict[str, float]  # ... and its median token's l_inf norm (mean over batches)

    def input_outlier_ratio(self, name: str) -> float:
        """How far the largest entry into Linear `name` stands above its median token: the
        massive activations a register prefix and a deletion can remove."""
        return self.input_max[name] / max(self.input_median_token[name], 1e-12)

    def massive_threshold(self, sensitive: int) -> torch.Tensor:
        return MASSIVE_RATIO * self.token_linf[sensitive][self.deletable].median()

    def massive_counts(self, sensitive: int) -> torch.Tensor:
        """Per image, its tokens at l_q's output above MASSIVE_RATIO x the median token. The
        largest count starts the k~ search: static scales are set by the worst image."""
        massive = self.token_linf[sensitive] > self.massive_threshold(sensitive)
        return (massive & self.deletable).sum(dim=-1)

    def largest_token(self, blocks: range) -> torch.Tensor:
        """Per image, its largest token l_inf norm at the output of `blocks`."""
        return torch.stack([self.token_linf[block].masked_fill(~self.deletable, 0).amax(dim=-1)
                            for block in blocks]).amax(dim=0)


@torch.no_grad()
def reference_pass(adapter: Adapter, batches: list[Batch], targets: list[str],
                   execution: ExecutionConfig = IN_MEMORY) -> Profile:
    """The Profile of `batches` on `adapter`'s full-precision model, the pass run as `execution`
    says; `targets` are the names of the Linears the recipe quantizes."""
    blocks = adapter.num_blocks
    token_linf: list[list[torch.Tensor]] = [[] for _ in range(blocks)]
    fc2_max = [0.0] * blocks
    input_max: dict[str, float] = {}
    medians: dict[str, list[float]] = {}
    outside = {name for name in targets if not any(name.startswith(block + ".") for block in adapter.block_names())}

    def on_block(index: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            token_linf[index].append(hidden_states_of(output).abs().amax(dim=-1))
        return hook

    def on_fc2(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            fc2_max[index] = max(fc2_max[index], args[0].abs().max().item())
        return hook

    def on_linear(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            tokens = args[0].abs().amax(dim=-1)
            input_max[name] = max(input_max.get(name, 0.0), tokens.max().item())
            medians.setdefault(name, []).append(tokens.median().item())
        return hook

    handles = [block.register_forward_hook(on_block(i)) for i, block in enumerate(adapter.blocks())]
    handles += [adapter.fc2(i).register_forward_pre_hook(on_fc2(i)) for i in range(blocks)]
    handles += [adapter.model.get_submodule(name).register_forward_pre_hook(on_linear(name))
                for name in targets if name not in outside]
    try:
        embeddings = forward_passes(adapter, distributed.shard(batches), execution, watched=targets, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # under torchrun: every rank's shard in rank order, as one pass over all of `batches` gives
    # it, so that every rank searches on the same profile
    parts = distributed.gather((embeddings, token_linf, fc2_max, input_max, medians), embeddings[0].device)
    embeddings = [embedding for part in parts for embedding in part[0]]
    token_linf = [[norms for part in parts for norms in part[1][index]] for index in range(blocks)]
    fc2_max = [max(part[2][index] for part in parts) for index in range(blocks)]
    input_max = {name: max(part[3][name] for part in parts) for name in input_max}
    medians = {name: [value for part in parts for value in part[4][name]] for name in medians}
    deletable = [_deletable(adapter, batch, norms.shape) for batch, norms in zip(batches, token_linf[0], strict=True)]
    before = _run_before_blocks(adapter, outside)
    median = {name: sum(values) / len(values) for name, values in medians.items()}
    return Profile(torch.cat(embeddings), [torch.cat(norms) for norms in token_linf], torch.cat(deletable), fc2_max,
                   before, input_max, median)


def _run_before_blocks(adapter: Adapter, names: set[str]) -> set[str]:
    """Which of the Linears `names` (outside the blocks) run before block 0: seen in the order of
    a probe forward, so that it does not depend on how the reference pass ran."""
    order: list[str] = []
    handles = [adapter.model.get_submodule(name).register_forward_pre_hook(lambda *_a, name=name: order.append(name))
               for name in names]
    handles.append(adapter.blocks()[0].register_forward_pre_hook(lambda *_a: order.append("")))
    try:
        with torch.no_grad():
            adapter.embed(adapter.probe_inputs())
    finally:
        for handle in handles:
            handle.remove()
    return set(order[: order.index("")])


def _deletable(adapter: Adapter, batch: Batch, shape: torch.Size) -> torch.Tensor:
    mask = adapter.token_mask(batch)
    deletable = torch.ones(shape, dtype=torch.bool, device=adapter.input_device) if mask is None else mask.bool().clone()
    deletable[:, : adapter.num_prefix_tokens] = False
    return deletable


class CalibrationImages:
    """The calibration images by index (calibration order), beside their full-precision embeddings."""

    def __init__(self, batches: list[Batch], embeddings: torch.Tensor):
        self.batches, self.embeddings = batches, embeddings
        self.count = count(batches)

    def batches_of(self, images: list[int]) -> list[Batch]:
        """These images, in batches of the calibration batch size."""
        where = [(batch, row) for batch, inputs in enumerate(self.batches) for row in range(batch_size(inputs))]
        size = batch_size(self.batches[0])
        chunks = [[where[image] for image in images[start : start + size]] for start in range(0, len(images), size)]
        return [{key: torch.cat([self.batches[batch][key][row : row + 1] for batch, row in chunk]) for key in self.batches[0]}
                for chunk in chunks]

    def split(self, validation_fraction: float) -> tuple[list[int], list[int]]:
        """The images that build (registers, sensitivity, a trial's scales) and the disjoint
        ones that judge the trials: the last `validation_fraction` of the calibration order
        (already a seeded shuffle), at least MIN_SEARCH_SAMPLES of each."""
        if self.count < 2 * MIN_SEARCH_SAMPLES:
            raise UserError(
                f"regcache needs at least {2 * MIN_SEARCH_SAMPLES} calibration images ({MIN_SEARCH_SAMPLES} to build the "
                f"registers, {MIN_SEARCH_SAMPLES} to validate the search), got {self.count}: raise calibration.num_samples"
            )
        validation = min(self.count - MIN_SEARCH_SAMPLES, max(MIN_SEARCH_SAMPLES, round(validation_fraction * self.count)))
        return list(range(self.count - validation)), list(range(self.count - validation, self.count))

    def subset(self, wanted: int, hardest_first: list[int], minimum: int = MIN_SEARCH_SAMPLES) -> list[int]:
        """`wanted` images of `hardest_first` (at least `minimum`, at most all of them),
        in calibration order. Static activation scales are set by the most extreme images of the
        whole set, so half the subset is the first of `hardest_first` and the other half the
        rest as they come."""
        wanted = min(len(hardest_first), max(minimum, wanted))
        hardest = set(hardest_first[: wanted // 2])
        rest = [image for image in sorted(hardest_first) if image not in hardest]
        return sorted(hardest) + rest[: wanted - len(hardest)]
