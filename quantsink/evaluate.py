"""Fidelity of a quantized model against its full-precision self, on the same inputs."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from quantsink.models.base import Adapter


def fidelity(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of each row (mean and worst) and the relative L2 error of the whole
    embedding matrix, ||quantized - reference|| / ||reference||."""
    reference, quantized = reference.double(), quantized.double()
    cosine = F.cosine_similarity(reference, quantized, dim=-1)
    return {
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "relative_l2": ((quantized - reference).norm() / reference.norm().clamp_min(1e-12)).item(),
        "samples": reference.shape[0],
    }


@torch.no_grad()
def embed_batches(adapter: Adapter, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The adapter's embedding of every preprocessed batch, concatenated in order."""
    return torch.cat([adapter.embed(inputs) for inputs in batches])
