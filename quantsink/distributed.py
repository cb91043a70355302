"""Data-parallel calibration over torch.distributed ranks, as `torchrun --nproc-per-node N -m
quantsink quantize ...` launches them.

Each rank calibrates a contiguous shard of the calibration batches (`shard`); what each rank
collected is gathered in rank order (`gather`) and combined as one process would have combined
it batch after batch, so the result is the single-process result bit for bit, not a float
all_reduce in another order:

  sharded and merged   the statistics pass and the observers' ranges (pipeline.calibrate),
                       KVSink's profile (methods.kvsink.profile_sinks), RegCache's reference
                       pass (methods.regcache.profile.reference_pass)
  replicated           every rank runs it on the same inputs and reaches the same state, the
                       computation being deterministic: RegCache's search trials (on subsets of
                       the calibration images), sink-tokens, smoothquant and kv-static (on the
                       whole calibration set)
  rank 0 only          the holdout fidelity and KV-cache evaluation, writing OUT, progress bars
                       and INFO logs (the CLI's other ranks log warnings and errors only)

A rank needs at least one batch (`require_shards`: every target must prove it ran on every
rank). In one process (no torchrun, or WORLD_SIZE 1) every function here is the identity, rank
0 or world size 1: no process group is created and no collective runs."""
from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Any, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from quantsink.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a rank waits in a collective for the others. torchrun ends every rank when one fails,
# so this bounds only a launch without it; the ranks' work between two collectives differs by
# at most rank 0's evaluation of the holdout and one shard's imbalance.
TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """Whether torchrun (or torch.distributed.run) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(device: str = "auto") -> bool:
    """Join torchrun's process group, once per process, when torchrun launched several ranks;
    whether this call did. nccl when the recipe's `device` (execution.device) is a GPU, each
    rank on cuda:LOCAL_RANK; gloo on the CPU."""
    if not launched() or dist.is_initialized():
        return False
    backend = "nccl" if device_for(device).type == "cuda" else "gloo"
    if backend == "nccl":  # so that "cuda" (and nccl's own buffers) mean this rank's GPU
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    atexit.register(teardown)
    if is_main():
        log.info("data-parallel calibration on %d ranks (%s)", world_size(), backend)
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# what torch says about each kind of accelerator it may have been built with
_AVAILABLE = {
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
    "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
}


def device_for(requested: str) -> torch.device:
    """The device execution.device names, on this machine and this rank: auto is cuda when torch
    sees a GPU and cpu otherwise; under torchrun a GPU rank computes on cuda:LOCAL_RANK. A device
    this machine lacks is refused, before anything loads."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    if not _AVAILABLE[device.type]():
        raise UserError(f"execution.device {requested}: torch sees no {device.type} device on this machine: "
                        "use --device cpu (or auto), or run where one is")
    # always with its index, as the tensors on it report their device
    if device.type != "cuda":
        return device if device.index is not None else torch.device(device.type, 0)
    if launched():
        if device.index is not None:
            raise UserError(f"execution.device {requested}: under torchrun each rank computes on cuda:LOCAL_RANK: "
                            "write --device cuda (or auto)")
        device = torch.device("cuda", local_rank())
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if device.index >= count:
        raise UserError(f"execution.device {device}: this machine has {count} GPU{'s' if count != 1 else ''} "
                        f"(cuda:0 to cuda:{count - 1}): pick one of them, or lower torchrun's --nproc-per-node")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def require_shards(batches: int) -> None:
    """Refuse a calibration set of fewer `batches` than ranks (one process: nothing to refuse)."""
    if batches < world_size():
        raise UserError(
            f"calibration: {batches} batches for {world_size()} ranks, and every rank needs at least one: "
            "lower torchrun's --nproc-per-node, lower calibration.batch_size or raise calibration.num_samples"
        )


def shard(batches: Iterable[T]) -> Sequence[T] | Iterable[T]:
    """This rank's contiguous share of `batches`, by whole batches, rank order being batch order:
    each rank's batches are batches of the single-process run. Every rank needs one, since every
    target must prove it ran on every rank. One process: `batches` as given."""
    world = world_size()
    if world == 1:
        return batches
    batches = list(batches)
    require_shards(len(batches))
    base, extra = divmod(len(batches), world)
    start = rank() * base + min(rank(), extra)
    return batches[start : start + base + (rank() < extra)]


def gather(obj: T, device: torch.device | str = "cpu") -> list[T]:
    """Every rank's `obj`, in rank order, its tensors on `device`; one process: [obj] as it is.
    Under nccl as under gloo the objects travel pickled (nccl moves the bytes through this
    rank's GPU), so the tensors in them may live on any device."""
    if world_size() == 1:
        return [obj]
    # sent from CPU: a tensor pickled on one rank's GPU would unpickle on that GPU on every rank
    local = tree_map(lambda leaf: leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf, obj)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return [tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf, part) for part in gathered]
