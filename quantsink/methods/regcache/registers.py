"""Steps b and c: the candidate tokens, and the registers averaged from their keys and values."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from quantsink.errors import UserError
from quantsink.methods.regcache.profile import CalibrationImages, Profile, batch_size
from quantsink.models.attention import KVPrefix
from quantsink.models.base import Adapter
from quantsink.models.probe import Tally

log = logging.getLogger(__name__)

CANDIDATE_BLOCKS_BEFORE = 3  # step b: l_q and up to this many blocks before it


@dataclass
class Registers:
    """One register per block from `first_block` on: (blocks, heads, head_dim) keys and values."""

    keys: torch.Tensor
    values: torch.Tensor
    first_block: int

    def prefix(self, block: int, copies: int) -> KVPrefix:
        """Block `block`'s register standing for `copies` identical entries (a log(copies) logit weight)."""
        index = block - self.first_block
        weight = None if copies == 1 else torch.tensor([math.log(copies)], dtype=self.keys.dtype, device=self.keys.device)
        return KVPrefix(self.keys[index][:, None], self.values[index][:, None], weight, Tally(f"the register prefix of block {block}"))

    def from_block(self, block: int) -> "Registers":
        index = block - self.first_block
        return Registers(self.keys[index:], self.values[index:], block)


def candidate_blocks(sensitive: int) -> range:
    return range(max(0, sensitive - CANDIDATE_BLOCKS_BEFORE), sensitive + 1)


def candidates(profile: Profile, sensitive: int, top_k: int, build: list[int]) -> set[tuple[int, int]]:
    """(image, token) of the `top_k` tokens by l_inf norm at each candidate block, among the
    `build` images."""
    allowed = torch.zeros(profile.deletable.shape[0], dtype=torch.bool, device=profile.deletable.device)
    allowed[build] = True
    images, tokens = (profile.deletable & allowed[:, None]).nonzero(as_tuple=True)
    chosen: set[tuple[int, int]] = set()
    for block in candidate_blocks(sensitive):
        norms = profile.token_linf[block][images, tokens]
        top = norms.topk(min(top_k, len(norms))).indices
        chosen.update(zip(images[top].tolist(), tokens[top].tolist()))
    if not chosen:
        raise UserError("regcache found no candidate tokens: the calibration images have no patch tokens")
    return chosen


def massive_candidates(profile: Profile, chosen: set[tuple[int, int]], sensitive: int) -> int:
    """How many candidates are massive at l_q's output; the registers stand for those, so
    ordinary tokens among the candidates dilute them."""
    threshold = profile.massive_threshold(sensitive)
    massive = sum(bool(profile.token_linf[sensitive][image, token] > threshold) for image, token in chosen)
    if massive < len(chosen) / 2:
        log.warning(
            "regcache: only %d of the %d candidate tokens are massive at block %d, so the registers mostly "
            "average ordinary tokens: lower candidate_top_k or calibrate on more images", massive, len(chosen), sensitive,
        )
    return massive


@torch.no_grad()
def average_registers(
    adapter: Adapter, images: CalibrationImages, chosen: set[tuple[int, int]], first: int
) -> tuple[Registers, float]:
    """Full-precision keys and values of the candidates at every block from `first`, averaged,
    and the cost in full passes; only the images that hold candidates are run."""
    hosts = sorted({image for image, _ in chosen})
    sums: dict[int, list[torch.Tensor]] = {}
    where: dict[str, torch.Tensor] = {}

    def observe(block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        picked = [tensor[where["images"], :, where["tokens"]].double().sum(dim=0) for tensor in (keys, values)]
        sums[block] = picked if block not in sums else [total + part for total, part in zip(sums[block], picked)]

    size = batch_size(images.batches[0])
    with adapter.observing_kv(range(first, adapter.num_blocks), observe):
        for start in range(0, len(hosts), size):
            row = {image: row for row, image in enumerate(hosts[start : start + size])}
            pairs = [(row[image], token) for image, token in sorted(chosen) if image in row]
            where["images"], where["tokens"] = torch.tensor(pairs, device=images.embeddings.device).T
            adapter.embed(images.batches_of(list(row))[0])
    dtype = images.embeddings.dtype
    blocks = range(first, adapter.num_blocks)
    keys = torch.stack([sums[block][0] / len(chosen) for block in blocks]).to(dtype)
    values = torch.stack([sums[block][1] / len(chosen) for block in blocks]).to(dtype)
    return Registers(keys, values, first), len(hosts) / images.count
