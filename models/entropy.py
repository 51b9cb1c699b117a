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
    mates (serving cuts them off the same way), so they must not count. The sum is a running
    (prefix) sum read at the sample's own last row: a reduction over all T rows, zeros
    included, rounds differently for another T, and a selective threshold sits exactly on one
    calibration image's score.
    """
    steps = iterations.to(rows.device).clamp(1, rows.shape[0])
    sums = rows.cumsum(dim=0).gather(0, (steps - 1).long()[None, :])[0]
    return sums / steps.to(rows.dtype)
