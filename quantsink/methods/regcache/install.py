"""Steps d and e on a model: the register prefix (from `prefix_start` on, or at l_q only) and the deletion at l_q."""
from __future__ import annotations

import functools

import torch
from torch import nn

from quantsink.methods.regcache.options import RegCacheSettings
from quantsink.methods.regcache.profile import Batch
from quantsink.methods.regcache.registers import Registers
from quantsink.models.base import Adapter
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import require_runs


def install(adapter: Adapter, settings: RegCacheSettings, registers: Registers) -> HandleSet:
    """Put RegCache on `adapter`'s model (an EditableEncoder), proven by a probe forward to run;
    `.remove()` (or the end of a `with` block) takes it off."""
    with installing(adapter.model, "regcache") as handles:
        tallies = []
        for block in settings.prefixed_blocks(adapter.num_blocks):
            prefix = registers.prefix(block, settings.num_registers)
            adapter.set_kv_prefix(block, prefix)
            handles.on_remove(functools.partial(adapter.set_kv_prefix, block, None))
            tallies.append(prefix.tally)
        handles.carries()  # a prefix is the same tensor for every forward
        if settings.delete_tokens:
            deletion = handles.add(adapter.delete_tokens_at(settings.sensitive_layer, settings.delete_tokens, settings.refill))
            handles.carries(deletion)
            tallies.append(deletion.tally)
        require_runs(adapter.model, tallies, lambda: adapter.embed(adapter.probe_inputs()))
    return handles


@torch.no_grad()
def sequence_maxima(adapter: Adapter, sensitive: int, inputs: list[Batch]) -> dict[str, float]:
    """With what is installed now, on `inputs`: the largest token l_inf norm entering block
    `sensitive` (after any deletion) and entering its fc2."""
    maxima = {"block_input": 0.0, "fc2_input": 0.0}

    def record(key: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            maxima[key] = max(maxima[key], args[0].abs().max().item())
        return hook

    handles = [adapter.blocks()[sensitive].register_forward_pre_hook(record("block_input")),
               adapter.fc2(sensitive).register_forward_pre_hook(record("fc2_input"))]
    try:
        for batch in inputs:
            adapter.embed(batch)
    finally:
        for handle in handles:
            handle.remove()
    return maxima
