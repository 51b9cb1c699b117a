"""Prediction entropy: the paper's measure of how settled a DEQ state is."""

from __future__ import annotations

import torch
from torch import Tensor


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy in nats of softmax(logits) over the last dimension."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def mean_over_own_iterates(rows: Tensor, iterations: Tensor) -> Tensor:
    """Per-sample mean of a [T, B] trajectory over the sample's own first `iterations` rows.

    Rows after a sample stopped repeat its last value, and their number depends on its batch
    mates (serving cuts them off the same way), so they must not count.
    """
    steps = iterations.to(rows.device).clamp(1, rows.shape[0])
    valid = torch.arange(rows.shape[0], device=rows.device)[:, None] < steps[None, :]
    return (rows * valid).sum(dim=0) / steps.to(rows.dtype)
