"""Prediction entropy: the paper's measure of how settled a DEQ state is."""

from __future__ import annotations

import torch
from torch import Tensor


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy in nats of softmax(logits) over the last dimension."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)
