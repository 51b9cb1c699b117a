"""Single-score attack detection: scores from a solve's trajectory, their calibrated threshold,
and the ROC numbers behind it.

The paper's observation is that adversarial inputs leave DEQ states uncertain along the dynamics.
Each score here maps a `SolveResult` to one number per sample, higher = more suspicious, so that
one threshold rule (`score > threshold`, `flag`) serves every score. Calibration (threshold at a
chosen false-positive rate on clean validation data) is computed by `deqguard eval --calibrate`
and stored in checkpoint metadata["detection"], which the server applies. The learned detector,
a model over several dynamics features, is models/learned_detector.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .entropy import mean_over_own_iterates, prediction_entropy

# classifier.py imports this module (a rectifier head reads the trajectory features): no import
# back, so the solve result is typed loosely here.
SolveResult = Any  # a models.classifier.SolveResult

SCORE_NAMES: tuple[str, ...] = ("final_entropy", "max_softmax", "mean_entropy",
                                "early_entropy", "iterations", "final_residual")


def entropy_rows(result: SolveResult) -> Tensor:
    """[T, B] entropy trajectory; a result without one has its final entropy as a single row."""
    if result.entropy is not None and result.entropy.numel() > 0:
        return result.entropy.detach().float()
    return prediction_entropy(result.logits.detach().float()).unsqueeze(0)


def trajectory_features(result: SolveResult, length: int) -> Tensor:
    """[B, 2*length] features: entropy and log10 residual at iterations 1..length.

    Short trajectories are padded with their last value (a stopped sample stays where it is).
    """
    ent = entropy_rows(result)
    res = result.residual.detach().float()
    if res.numel() == 0:
        res = torch.zeros_like(ent)
    return path_features(ent, res, length)


def path_features(entropy: Tensor, residual: Tensor, length: int) -> Tensor:
    """[B, 2*length] from [T, B] entropy and relative-residual rows, padded with the last row.

    The one layout both the recorded features and the attack's differentiable ones
    (`DEQClassifier.graph_trajectory_features`) go through, so the two cannot drift apart.
    """

    def fit(rows: Tensor) -> Tensor:
        if rows.shape[0] >= length:
            return rows[:length]
        return torch.cat([rows, rows[-1:].expand(length - rows.shape[0], -1)])

    res = torch.log10(residual.clamp_min(1e-8))
    return torch.cat([fit(entropy), fit(res)]).T.contiguous()


def detection_score(result: SolveResult, name: str, *, early_index: int = 1,
                    params: dict[str, Any] | None = None) -> Tensor:
    """Per-sample suspicion score [B] (higher = more suspicious).

    final_entropy: entropy of the returned prediction. max_softmax: 1 - max probability (the
    baseline of Hendrycks & Gimpel). mean_entropy: entropy averaged over the sample's own
    iterates (its first `iterations` rows).
    early_entropy: entropy at iterate `early_index` (0-based row of the trajectory, clamped).
    iterations: solver steps taken. final_residual: last relative residual. logistic: a linear
    model over `trajectory_features` with `params` = {"length", "weights", "bias", "mean", "std"}.
    """
    logits = result.logits.detach().float()
    if name == "final_entropy":
        return prediction_entropy(logits)
    if name == "max_softmax":
        return 1.0 - torch.softmax(logits, dim=-1).max(dim=-1).values
    if name == "mean_entropy":
        rows = entropy_rows(result)
        if rows.shape[0] == 1:
            return rows[0]
        return mean_over_own_iterates(rows, result.iterations)
    if name == "early_entropy":
        rows = entropy_rows(result)
        return rows[min(max(early_index, 0), rows.shape[0] - 1)]
    if name == "iterations":
        return result.iterations.detach().float()
    if name == "final_residual":
        if result.residual.numel() == 0:
            return torch.zeros(logits.shape[0], device=logits.device)
        return result.residual[-1].detach().float()
    if name == "logistic":
        if not params:
            raise ValueError("the logistic score needs its fitted params")
        feats = trajectory_features(result, int(params["length"]))
        mean = torch.tensor(params["mean"], dtype=feats.dtype, device=feats.device)
        std = torch.tensor(params["std"], dtype=feats.dtype, device=feats.device)
        w = torch.tensor(params["weights"], dtype=feats.dtype, device=feats.device)
        return ((feats - mean) / std) @ w + float(params["bias"])
    raise ValueError(f"unknown detection score {name!r}; known: {[*SCORE_NAMES, 'logistic']}")


class DetectionCalibration(BaseModel):
    """A score with its threshold, as stored in checkpoint metadata["detection"].

    `threshold` was chosen so that a fraction `fpr` of the clean calibration inputs score above
    it; `auroc` / `tpr` are measured against the attack named in `attack` at radius `eps`.
    """

    model_config = ConfigDict(extra="allow")
    score: str
    threshold: float
    fpr: float = Field(ge=0, le=1)
    auroc: float | None = None
    tpr: float | None = None
    attack: str | None = None
    eps: float | None = None
    n_calibration: int | None = None
    early_index: int = 1
    defense: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)


def flag(result: SolveResult, calibration: DetectionCalibration | dict[str, Any]
         ) -> tuple[Tensor, Tensor]:
    """(score [B], suspicious [B] bool) for a solve under a stored calibration."""
    cal = (calibration if isinstance(calibration, DetectionCalibration)
           else DetectionCalibration.model_validate(calibration))
    score = detection_score(result, cal.score, early_index=cal.early_index, params=cal.params)
    return score, score > cal.threshold


# -- numbers behind a calibration (numpy; used by evaluation, small enough to live here) ---------

def calibrate_threshold(clean_scores: np.ndarray | Tensor, fpr: float) -> float:
    """Smallest observed threshold with at most a fraction `fpr` of clean scores above it."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("no clean scores to calibrate on")
    k = int(np.floor(fpr * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def roc_curve(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule `score > t`, thresholds from +inf down to the minimum.

    Tied scores enter together, so the curve has one point per distinct score.
    """
    neg = np.asarray(neg, dtype=np.float64).ravel()
    pos = np.asarray(pos, dtype=np.float64).ravel()
    scores = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # end of each tie group
    tp = np.cumsum(labels)[last]
    fp = np.cumsum(1 - labels)[last]
    fpr = np.r_[0.0, fp / max(neg.size, 1)]
    tpr = np.r_[0.0, tp / max(pos.size, 1)]
    return fpr, tpr, np.r_[np.inf, scores[last]]


def auroc(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor) -> float:
    """Area under the ROC curve = P(pos score > neg score) + 0.5 P(tie)."""
    fpr, tpr, _ = roc_curve(neg, pos)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor, fpr: float = 0.05
               ) -> tuple[float, float]:
    """(TPR, threshold) with the threshold calibrated on `neg` at the given FPR."""
    t = calibrate_threshold(neg, fpr)
    pos = np.asarray(pos, dtype=np.float64).ravel()
    return float(np.mean(pos > t)) if pos.size else float("nan"), t
