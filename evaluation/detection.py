"""Detection experiments: trajectories of clean and attacked inputs, scores, ROC, calibration.

Negatives are clean test inputs; positives are adversarial inputs, counted twice: every attacked
input ("all") and the successful ones (a correctly classified input the attack flipped), which
are the ones a detector must catch. Thresholds for the stored calibration come from clean
*validation* inputs only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import SolveResult
from deqguard.models.detection_scores import (
    DetectionCalibration,
    auroc,
    calibrate_threshold,
    detection_score,
    entropy_rows,
    roc_curve,
    tpr_at_fpr,
    trajectory_features,
)

from .detector_fit import logistic_regression
from .schema import Curve, DetectionAttack, ScoreResult, Trajectory

SolveFn = Callable[[Tensor], SolveResult]


def _pad_rows(rows: Tensor, length: int) -> Tensor:
    if rows.shape[0] >= length:
        return rows
    return torch.cat([rows, rows[-1:].expand(length - rows.shape[0], -1)])


def solve_all(solve: SolveFn, x: Tensor, batch_size: int) -> SolveResult:
    """One SolveResult for a whole set, batch by batch, trajectories padded to a common length.

    Padding repeats a batch's last row, which is what a stopped sample does within a batch.
    """
    parts = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            r = solve(x[i:i + batch_size])
        parts.append(SolveResult(
            logits=r.logits.detach(), residual=r.residual.detach(),
            iterations=r.iterations, converged=r.converged,
            entropy=None if r.entropy is None else r.entropy.detach()))
    t_ent = max((p.entropy.shape[0] for p in parts if p.entropy is not None), default=0)
    t_res = max(p.residual.shape[0] for p in parts)
    entropy = (torch.cat([_pad_rows(p.entropy, t_ent) for p in parts], dim=1)
               if t_ent and all(p.entropy is not None for p in parts) else None)
    residual = torch.cat([_pad_rows(p.residual, t_res) if p.residual.numel() else
                          p.residual.new_zeros(t_res, p.logits.shape[0]) for p in parts], dim=1)
    return SolveResult(logits=torch.cat([p.logits for p in parts]), residual=residual,
                       iterations=torch.cat([p.iterations for p in parts]),
                       converged=torch.cat([p.converged for p in parts]), entropy=entropy)


def subset(result: SolveResult, mask: Tensor) -> SolveResult:
    return SolveResult(
        logits=result.logits[mask], residual=result.residual[:, mask],
        iterations=result.iterations[mask], converged=result.converged[mask],
        entropy=None if result.entropy is None else result.entropy[:, mask])


def trajectory_summary(label: str, result: SolveResult) -> Trajectory:
    ent = entropy_rows(result).cpu().numpy()
    res = result.residual.detach().float().cpu().numpy()
    if ent.shape[1] == 0:
        empty: list[float] = []
        return Trajectory(label=label, n=0, entropy_mean=empty, entropy_q25=empty,
                          entropy_q75=empty, residual_median=empty)
    return Trajectory(
        label=label, n=int(ent.shape[1]), entropy_mean=ent.mean(1).tolist(),
        entropy_q25=np.quantile(ent, 0.25, axis=1).tolist(),
        entropy_q75=np.quantile(ent, 0.75, axis=1).tolist(),
        residual_median=(np.median(res, axis=1).tolist() if res.size else []))


def _downsample(fpr: np.ndarray, tpr: np.ndarray, points: int = 101) -> Curve:
    if fpr.size > points:
        idx = np.unique(np.linspace(0, fpr.size - 1, points).round().astype(int))
        fpr, tpr = fpr[idx], tpr[idx]
    return Curve(fpr=fpr.tolist(), tpr=tpr.tolist())


def score_all(result: SolveResult, names: list[str], early_index: int,
              params: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    params = params or {}
    return {n: detection_score(result, n, early_index=early_index,
                               params=params.get(n)).cpu().numpy() for n in names}


def detect_attack(attack: str, clean_scores: dict[str, np.ndarray],
                  adv_scores: dict[str, np.ndarray], successful: np.ndarray, fpr: float,
                  val_thresholds: dict[str, float] | None = None) -> DetectionAttack:
    """AUROC / TPR of every score for one attack."""
    scores, roc = {}, {}
    for name, neg in clean_scores.items():
        pos_all = adv_scores[name]
        pos = pos_all[successful]
        tpr, _ = tpr_at_fpr(neg, pos, fpr)
        val_t = (val_thresholds or {}).get(name)
        scores[name] = ScoreResult(
            auroc=auroc(neg, pos) if pos.size else None,
            tpr_at_fpr=tpr if pos.size else None, auroc_all=auroc(neg, pos_all),
            tpr_at_val_threshold=(float(np.mean(pos > val_t)) if val_t is not None and pos.size
                                  else None))
        if pos.size:
            f, t, _ = roc_curve(neg, pos)
            roc[name] = _downsample(f, t)
    return DetectionAttack(attack=attack, n_successful=int(successful.sum()),
                           n_all=int(successful.size), scores=scores, roc=roc)


def fit_logistic(clean: SolveResult, adv: SolveResult, length: int | None = None,
                 l2: float = 1e-2, steps: int = 200) -> dict:
    """Logistic regression over `trajectory_features` (entropy and log-residual per iterate).

    Fit on a validation split; the returned params are what `detection_score(..., "logistic")`
    reads (and what a calibration stores).
    """
    if length is None:
        rows = clean.entropy.shape[0] if clean.entropy is not None else 1
        length = max(rows, adv.entropy.shape[0] if adv.entropy is not None else 1)
    f0, f1 = trajectory_features(clean, length).cpu(), trajectory_features(adv, length).cpu()
    mean, std, w, b = logistic_regression(f0, f1, l2=l2, steps=steps)
    return {"length": int(length), "weights": w.tolist(), "bias": float(b),
            "mean": mean.tolist(), "std": std.tolist(), "l2": l2,
            "n_clean": int(len(f0)), "n_adv": int(len(f1))}


def calibrate(val_clean: SolveResult, score: str, fpr: float, *, early_index: int,
              params: dict | None = None, **extra) -> DetectionCalibration:
    """Threshold on clean validation inputs so that a fraction `fpr` of them is flagged."""
    s = detection_score(val_clean, score, early_index=early_index, params=params).cpu().numpy()
    return DetectionCalibration(score=score, threshold=calibrate_threshold(s, fpr), fpr=fpr,
                                n_calibration=int(s.size), early_index=early_index,
                                params=params or {}, **extra)
