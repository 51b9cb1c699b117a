"""Fitting, calibrating and measuring the learned detector (models/learned_detector.py).

Protocol, so that no reported number comes from images the detector was fitted or calibrated on:
the logistic model is fitted on clean vs attacked *validation* images (several attacks and radii;
failed attacks count as attacks), its threshold is calibrated at the asked FPR on a *separate*
set of clean validation images, and every number reported on test images comes with a bootstrap
95% interval. Single features are oriented (higher = attacked) by
the sign of their validation mean difference, never by the test set.

The fit is L2-regularised logistic regression by L-BFGS in torch (scikit-learn is not a
dependency of deqguard); the result is stored as plain numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import Classifier
from deqguard.models.detection_scores import calibrate_threshold, roc_curve
from deqguard.models.dynamics import DynamicsConfig
from deqguard.models.learned_detector import LogisticDetector

from .bootstrap import bootstrap_many

Features = dict[str, np.ndarray]


def compute_features(model: Classifier, x: Tensor, cfg: DynamicsConfig, *,
                     batch_size: int = 50) -> Features:
    """{name: [N]} dynamics features plus `_pred` (the final prediction), batch by batch."""
    parts: list[dict[str, Tensor]] = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            r = model.solve(x[i:i + batch_size], features=cfg)
        assert r.features is not None
        parts.append({**r.features, "_pred": r.logits.argmax(-1).float()})
    return {k: torch.cat([p[k] for p in parts]).cpu().double().numpy() for k in parts[0]}


def cached_features(model: Classifier, x: Tensor, cfg: DynamicsConfig, cache: str | Path,
                    label: str, *, log: Callable[[str], None] = print) -> Features:
    """`compute_features`, cached under `cache` keyed by the label, config and the images."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    h.update(x.detach().cpu().numpy().tobytes())
    path = Path(cache) / f"{label}-{h.hexdigest()[:12]}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    feats = compute_features(model, x, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feats)
    log(f"features {label}: {len(x)} images -> {path}")
    return feats


def logistic_regression(f0: Tensor, f1: Tensor, *, l2: float = 1e-2, steps: int = 500
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, std, coef, intercept) of L2 logistic regression on standardised features, f1 = 1.

    The two classes count equally whatever their sizes (class weights). Fitted in float64 by
    L-BFGS in torch, so no scikit-learn is needed anywhere.
    """
    feats = torch.cat([f0, f1]).double()
    labels = torch.cat([torch.zeros(len(f0)), torch.ones(len(f1))]).double()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    weight = torch.where(labels > 0, len(labels) / (2 * len(f1)), len(labels) / (2 * len(f0)))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels,
                                                                    weight=weight)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, w.detach(), b.detach()


def fit_logistic(clean: Features, adv: Features, names: list[str], *, l2: float = 1e-2,
                 steps: int = 500) -> tuple[list[float], list[float], list[float], float]:
    """(mean, std, coef, intercept) over the named dynamics features, attacked = 1."""
    f0 = torch.from_numpy(np.stack([clean[n] for n in names], 1))
    f1 = torch.from_numpy(np.stack([adv[n] for n in names], 1))
    mean, std, w, b = logistic_regression(f0, f1, l2=l2, steps=steps)
    return mean.tolist(), std.tolist(), w.tolist(), float(b)


def build_detector(fit_clean: Features, fit_adv: Features, cal_clean: Features,
                   cfg: DynamicsConfig, *, names: list[str] | None = None, fpr: float = 0.05,
                   l2: float = 1e-2, model_sha256: str = "",
                   training: dict[str, Any] | None = None) -> LogisticDetector:
    """Fit on (fit_clean, fit_adv), then calibrate the threshold on cal_clean at `fpr`."""
    names = names or cfg.names()
    # a feature constant over the fitting data carries nothing and would divide by ~0
    names = [n for n in names if np.ptp(np.concatenate([fit_clean[n], fit_adv[n]])) > 0]
    mean, std, coef, intercept = fit_logistic(fit_clean, fit_adv, names, l2=l2)
    det = LogisticDetector(features=names, mean=mean, std=std, coef=coef, intercept=intercept,
                           threshold=0.0, fpr=fpr, dynamics=cfg, model_sha256=model_sha256,
                           training={**(training or {}), "l2": l2,
                                     "n_fit_clean": int(len(fit_clean[names[0]])),
                                     "n_fit_attacked": int(len(fit_adv[names[0]])),
                                     "n_calibration_clean": int(len(cal_clean[names[0]]))})
    threshold = calibrate_threshold(score_features(det, cal_clean), fpr)
    return det.model_copy(update={"threshold": threshold})


def score_features(det: LogisticDetector, feats: Features) -> np.ndarray:
    t = {n: torch.from_numpy(np.asarray(feats[n], np.float64)) for n in det.features}
    return det.score(t).numpy()


# -- metrics with bootstrap intervals --------------------------------------------------------------

def auroc_fast(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half (equals models.detection_scores.auroc)."""
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at(neg: np.ndarray, pos: np.ndarray, fpr: float) -> float:
    return float(np.mean(pos > calibrate_threshold(neg, fpr)))


def bootstrap(neg: np.ndarray, pos: np.ndarray, fpr: float, *, reps: int = 1000, seed: int = 0
              ) -> dict[str, Any]:
    """AUROC and TPR at `fpr` (threshold from these negatives) with percentile 95% intervals;
    negatives and positives are resampled independently."""
    ci = bootstrap_many(lambda n, p: {"auroc": auroc_fast(n, p), "tpr": tpr_at(n, p, fpr)},
                        [(neg,), (pos,)], reps=reps, seed=seed)
    return {"auroc": auroc_fast(neg, pos), "auroc_ci": ci["auroc"],
            "tpr": tpr_at(neg, pos, fpr), "tpr_ci": ci["tpr"],
            "n_neg": int(len(neg)), "n_pos": int(len(pos))}


def paired_difference(neg_a: np.ndarray, pos_a: np.ndarray, neg_b: np.ndarray,
                      pos_b: np.ndarray, *, reps: int = 1000, seed: int = 1) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same samples, bootstrap 95% interval (paired resampling)."""
    ci = bootstrap_many(
        lambda na, nb, pa, pb: {"diff": auroc_fast(na, pa) - auroc_fast(nb, pb)},
        [(neg_a, neg_b), (pos_a, pos_b)], reps=reps, seed=seed)
    return {"diff": auroc_fast(neg_a, pos_a) - auroc_fast(neg_b, pos_b), "ci": ci["diff"]}


def orientation(val_clean: Features, val_adv: Features, name: str) -> float:
    """+1 if the feature is larger on attacked validation inputs, else -1."""
    return 1.0 if np.mean(val_adv[name]) >= np.mean(val_clean[name]) else -1.0


def evaluate_scores(det: LogisticDetector, val_clean: Features, val_adv: Features,
                    test_clean: Features, test_adv: Features, y_test: np.ndarray, *,
                    fpr: float = 0.05, reps: int = 1000) -> dict[str, Any]:
    """Every single feature, the learned detector; "all" and "successful vs correct" views."""
    clean_ok = test_clean["_pred"] == y_test
    fooled = test_adv["_pred"] != y_test
    successful = clean_ok & fooled
    scores_clean: dict[str, np.ndarray] = {"detector": score_features(det, test_clean)}
    scores_adv: dict[str, np.ndarray] = {"detector": score_features(det, test_adv)}
    for name in det.dynamics.names():
        if name not in test_clean:
            continue
        s = orientation(val_clean, val_adv, name)
        scores_clean[name] = s * test_clean[name]
        scores_adv[name] = s * test_adv[name]
    out: dict[str, Any] = {"n_clean": int(len(y_test)), "n_clean_correct": int(clean_ok.sum()),
                           "n_attacked": int(len(y_test)), "n_successful": int(successful.sum()),
                           "fpr": fpr, "bootstrap_reps": reps, "scores": {}}
    for name in scores_clean:
        entry = {"all": bootstrap(scores_clean[name], scores_adv[name], fpr, reps=reps)}
        if successful.any():
            entry["successful"] = bootstrap(scores_clean[name][clean_ok],
                                            scores_adv[name][successful], fpr, reps=reps)
        out["scores"][name] = entry
    if "max_softmax" in scores_clean:
        out["detector_minus_max_softmax"] = {
            "all": paired_difference(scores_clean["detector"], scores_adv["detector"],
                                     scores_clean["max_softmax"], scores_adv["max_softmax"],
                                     reps=reps)}
    out["detector_at_stored_threshold"] = {
        "clean_flagged": float(np.mean(scores_clean["detector"] > det.threshold)),
        "attacked_flagged": float(np.mean(scores_adv["detector"] > det.threshold)),
        "successful_flagged": (float(np.mean(scores_adv["detector"][successful] > det.threshold))
                               if successful.any() else None)}
    out["_curves"] = {n: roc_curve(scores_clean[n], scores_adv[n])[:2]
                      for n in ("detector", "max_softmax") if n in scores_clean}
    return out


def save_json(obj: Any, path: str | Path) -> None:
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if not str(k).startswith("_")}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        return o

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(obj), indent=1))
