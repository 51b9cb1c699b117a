"""The adaptive attack on the learned detector: misclassify and look clean at once.

PGD maximises CE(logits, y) - lam * s(x), where s is the detector's own logistic score over the
*differentiable* dynamics features (models/dynamics.py, `differentiable=True`): the solve runs
under exact autograd (backprop through every solver iteration), the Jacobian estimate through a
double backward, the restart through its own exact solve. Counting features (iterations,
converged, disagreements) are constants to the attacker. The attacker knows the fixed random
patterns too. Success is judged on the real pipeline: the served prediction and the stored
threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.models.classifier import DEQClassifier, SolveResult
from deqguard.models.dynamics import dynamics_features
from deqguard.models.learned_detector import LogisticDetector
from deqguard.training.attacks import pgd

from .attacks import default_step_size


def surrogate_score_and_logits(model: DEQClassifier, det: LogisticDetector, x: Tensor
                               ) -> tuple[Tensor, Tensor]:
    """(detector score [B], logits [B, K]) with a graph back to x (exact gradients)."""
    eq = model.equilibrium(x, grad="exact", keep_states=True)
    logits = model.decode(eq.z)
    out = eq.output
    res = SolveResult(logits=logits, residual=out.residual, iterations=out.iterations,
                      converged=out.converged, z=eq.z, states=out.states or [eq.z])
    feats = dynamics_features(model, x, res, det.dynamics, differentiable=True)
    return det.score(feats), logits


def detector_aware_pgd(model: DEQClassifier, det: LogisticDetector, x: Tensor, y: Tensor, *,
                       eps: float, lam: float, steps: int = 10, seed: int = 0) -> Tensor:
    """x_adv maximising CE - lam * detector score, from a uniform random start."""

    def loss(xa: Tensor) -> Tensor:
        score, logits = surrogate_score_and_logits(model, det, xa)
        return F.cross_entropy(logits, y, reduction="none") - lam * score

    gen = torch.Generator(device=x.device).manual_seed(seed)
    return pgd(loss, x, eps=eps, step_size=default_step_size(eps, steps), steps=steps,
               start="uniform", generator=gen)


def undetected_errors(pred: np.ndarray, y: np.ndarray, score: np.ndarray, threshold: float
                      ) -> dict[str, float]:
    """Rates over all attacked inputs: misclassified; misclassified AND not flagged."""
    wrong = pred != y
    return {"misclassified": float(wrong.mean()),
            "misclassified_unflagged": float((wrong & (score <= threshold)).mean()),
            "mean_score": float(score.mean())}


def summarise(y: np.ndarray, threshold: float, runs: dict[str, tuple[np.ndarray, np.ndarray]]
              ) -> dict[str, Any]:
    """Per attack the rates, plus the per-sample worst case over all of them (a sample counts
    when any attack left it misclassified and unflagged)."""
    out: dict[str, Any] = {name: undetected_errors(p, y, s, threshold)
                           for name, (p, s) in runs.items()}
    if runs:
        bad = np.zeros(len(y), bool)
        wrong_any = np.zeros(len(y), bool)
        for p, s in runs.values():
            bad |= (p != y) & (s <= threshold)
            wrong_any |= p != y
        out["worst_case"] = {"misclassified": float(wrong_any.mean()),
                             "misclassified_unflagged": float(bad.mean())}
    return out
