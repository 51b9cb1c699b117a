"""The rectified-rejection head: a doubt score trained to doubt (Pang et al., CVPR 2022).

Every other doubt score is read off a model trained only to classify, and an attack that makes
the answer wrong tends to make it confidently wrong. Rectified rejection adds a scalar head A and
serves the rectified confidence R = max p x sigmoid(A). The head is trained with binary cross
entropy pulling R towards the *detached* true-class probability p_y on the adversarial batch of
adversarial training; at its optimum sigmoid(A) = p_y / max p, so R estimates p_y, and p_y is
below max p exactly where the answer is wrong. The served doubt (higher = less sure, the
convention of models/selective.py) is 1 - R.

The DEQ's own variant also feeds the head the solver's path (entropy and relative residual of
the first iterates, `detection_scores.trajectory_features`), which an explicit network lacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RectifierConfig

# torch's binary_cross_entropy clamps its logs at -100; the same bound keeps R = 0 or 1 finite
_LOG_FLOOR = -100.0


class Rectifier(nn.Module):
    """A(z*, trajectory): one hidden layer over the flattened state and the path features."""

    def __init__(self, state_size: int, config: RectifierConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(state_size + 2 * config.trajectory, config.hidden),
                                 nn.ReLU(), nn.Linear(config.hidden, 1))

    def forward(self, z: Tensor, trajectory: Tensor | None = None) -> Tensor:
        """A [B] (a logit) from a state [B, ...] and, if configured, features [B, 2 x length]."""
        feats = z.flatten(1)
        if self.config.trajectory:
            if trajectory is None:
                raise ValueError("this rectifier reads the solver's trajectory; none was given")
            feats = torch.cat([feats, trajectory.to(feats.dtype)], dim=1)
        return self.net(feats).squeeze(-1)


def rectified_confidence(logits: Tensor, a: Tensor) -> Tensor:
    """R = max p x sigmoid(A) per sample [B]."""
    p_max = torch.softmax(logits.float(), dim=-1).max(dim=-1).values
    return p_max * torch.sigmoid(a.float())


def rectified_doubt(logits: Tensor, a: Tensor) -> Tensor:
    """1 - R: the served doubt, strictly decreasing in sigmoid(A) at a fixed max p."""
    return 1.0 - rectified_confidence(logits, a)


def rectified_loss(logits: Tensor, a: Tensor, y: Tensor) -> Tensor:
    """Mean BCE(R, stopgrad(p_y)): the head (and, through max p, the classifier) learns R ~ p_y."""
    return rectified_bce(logits, a, y).mean()


def rectified_bce(logits: Tensor, a: Tensor, y: Tensor) -> Tensor:
    """Per-sample BCE(R, stopgrad(p_y)) [B]: the training term, and the term an attacker aimed
    at the head *raises* (once the answer is wrong, p_y is small and a large R is far from it).

    Written with log-softmax and log-sigmoid rather than F.binary_cross_entropy: that one is
    refused under autocast and loses precision at R near 0.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    target = log_p.detach().gather(1, y[:, None]).squeeze(1).exp()
    log_r = log_p.max(dim=-1).values + F.logsigmoid(a.float())
    r = log_r.exp()
    log_not_r = torch.log1p(-r.clamp(max=1.0 - 1e-7))
    return -(target * log_r.clamp_min(_LOG_FLOOR)
             + (1 - target) * log_not_r.clamp_min(_LOG_FLOOR))
