"""The selective part of `deqguard eval`: what abstaining buys per doubt score; its calibration.

Protocol, so that a threshold never sees the inputs it is judged on:
- Thresholds come from clean *validation* images only (the checkpoint's own split); the one at
  the target coverage (0.9 by default) is where every kind of test input is judged.
- Test inputs: clean; PGD-40 through the exact gradient (backprop through every solver
  iteration), crafted as `deqguard detect` crafts its sets (advsets.py, optionally cached and
  resumable); the detector-aware PGD of detector_attack.py (CE - lambda x the learned detector's
  score, exact gradients) when the checkpoint has a learned detector.
- Per score and kind: the risk-coverage curve and its area (risk_coverage.py); at the target
  threshold the share answered, the accuracy among the answered and, for attacks, the share of
  successful attacks (a correct clean answer flipped) that are answered, each with a bootstrap
  95% interval over the test inputs, the threshold held fixed.
Every score comes from one solve per batch with the checkpoint's default options and no early
exit: the solve the server runs below coverage 1. The scores themselves are models/selective.py's
(`doubt_score`), the same functions the server calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import Classifier
from deqguard.models.selective import (
    SCORE_NAMES,
    SelectiveCalibration,
    calibrate,
    coverage_threshold,
    doubt_score,
)

from .bootstrap import bootstrap_many
from .risk_coverage import answered_stats, aurc, downsample, risk_coverage
from .schema import (
    RiskCoverageCurve,
    SelectiveKind,
    SelectiveScoreResult,
    SelectiveSection,
    SelectiveSettings,
)

Log = Callable[[str], None]


@dataclass
class Scored:
    """Doubt scores {name: [N]} and predictions [N] of a set of inputs."""

    scores: dict[str, np.ndarray]
    pred: np.ndarray


def score_inputs(model: Classifier, x: Tensor, names: list[str], detector: Any = None, *,
                 batch_size: int = 128) -> Scored:
    """One solve per batch (with the detector's features when `detector` is scored)."""
    cfg = detector.dynamics if "detector" in names else None
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    preds = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            r = model.solve(x[i:i + batch_size], features=cfg)
        for n in names:
            parts[n].append(doubt_score(r, n, detector).detach().double().cpu().numpy())
        preds.append(r.logits.argmax(1).cpu().numpy())
    return Scored({n: np.concatenate(v) for n, v in parts.items()}, np.concatenate(preds))


def solve_spec(model: Classifier) -> dict[str, Any]:
    """The solve the scores come from: the checkpoint's defaults (nothing for a feedforward)."""
    cfg = getattr(model.config, "solver", None) if model.is_deq else None
    if cfg is None:
        return {}
    return {"solver": cfg.solver, "max_iter": cfg.max_iter, "tol": cfg.tol}


def calibration(model: Classifier, val: Scored, y_val: np.ndarray, s: SelectiveSettings, *,
                sha256: str, detector: Any = None) -> SelectiveCalibration:
    """The stored calibration of `s.score`, with the validation accuracy among the answered at
    every stored coverage (GET /model shows it)."""
    scores = val.scores[s.score]
    provenance = {**s.provenance,
                  "images": f"the first {len(scores)} images of the validation split (clean)",
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
    cal = calibrate(scores, s.score, s.coverages, solve=solve_spec(model), model_sha256=sha256,
                    detector=detector, provenance=provenance)
    correct = val.pred == y_val
    answered = [answered_stats(scores, correct, t)["accuracy_answered"] for t in cal.thresholds]
    return cal.model_copy(update={"metrics": {
        "val_accuracy": float(correct.mean()),
        "val_accuracy_answered": [None if np.isnan(a) else a for a in answered]}})


def _num(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def judge(doubt: np.ndarray, correct: np.ndarray, threshold: float,
          successful: np.ndarray | None, *, reps: int, seed: int) -> SelectiveScoreResult:
    """One score on one kind of input: curve, AURC and the numbers at `threshold`, with
    intervals (inputs resampled together with their correctness and success flags)."""
    cov, acc = risk_coverage(doubt, correct)
    at = answered_stats(doubt, correct, threshold, successful)
    arrays = (doubt, correct) if successful is None else (doubt, correct, successful)

    def stats(d: np.ndarray, c: np.ndarray, s: np.ndarray | None = None) -> dict[str, float]:
        return {"aurc": aurc(d, c), **answered_stats(d, c, threshold, s)}

    ci = bootstrap_many(stats, [arrays], reps=reps, seed=seed)
    curve_cov, curve_acc = downsample(cov, acc)
    return SelectiveScoreResult(
        aurc=aurc(doubt, correct), aurc_ci=ci["aurc"], threshold=threshold,
        coverage=_num(at["coverage"]), coverage_ci=ci["coverage"],
        accuracy_answered=_num(at["accuracy_answered"]),
        accuracy_answered_ci=ci["accuracy_answered"],
        successful_answered=_num(at.get("successful_answered", float("nan"))),
        successful_answered_ci=ci.get("successful_answered"),
        curve=RiskCoverageCurve(coverage=curve_cov, accuracy=curve_acc))


def judge_kind(kind: str, scored: Scored, y: np.ndarray, thresholds: dict[str, float], *,
               clean_correct: np.ndarray | None, reps: int, seed: int,
               attack: dict[str, Any] | None = None) -> SelectiveKind:
    """Every score on one kind of input; `clean_correct` (attacks only) marks the inputs whose
    clean answer was right, so that `successful` = right when clean, wrong when attacked."""
    correct = scored.pred == y
    successful = None if clean_correct is None else clean_correct & ~correct
    results = {name: judge(scored.scores[name], correct, t, successful, reps=reps, seed=seed)
               for name, t in thresholds.items()}
    # ties (common on small sets) go to the lower AURC, the whole curve's verdict
    ranked = [(r.accuracy_answered, -r.aurc, n) for n, r in results.items()
              if r.accuracy_answered is not None]
    return SelectiveKind(kind=kind, attack=attack, n=len(y), accuracy=float(correct.mean()),
                         n_successful=None if successful is None else int(successful.sum()),
                         scores=results, best=max(ranked)[2] if ranked else None)


def _cache(s: SelectiveSettings, sha256: str, x: Tensor) -> Path | None:
    """The cache folder of attacks on these weights and these images (None: no cache)."""
    if s.cache is None:
        return None
    h = hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:12]
    return Path(s.cache) / sha256[:16] / f"selective-{len(x)}-{h}"


def attacked_sets(model: Classifier, x: Tensor, y: Tensor, s: SelectiveSettings, *, eps: float,
                  seed: int, sha256: str, detector: Any, log: Log
                  ) -> list[tuple[str, dict[str, Any], Tensor]]:
    """(name, spec, x_adv) of the PGD set on the first `attack_n` images and, with a learned
    detector, of the detector-aware set on the first `adaptive_n`."""
    from .advsets import CraftSpec, cached_chunks, craft
    from .attacks import default_step_size

    out = []
    m = min(s.attack_n or len(x), len(x))
    grad = s.pgd_gradient if model.is_deq else "direct"
    spec = CraftSpec("pgd", eps, s.pgd_steps, "test", 0, m, seed=seed, gradient=grad)
    cache = _cache(s, sha256, x[:m])
    x_adv = craft(model, spec, x[:m], y[:m], cache, log=log).to(x.device)
    out.append((f"pgd{s.pgd_steps}-{grad}", {"attack": "pgd", "eps": eps, "steps": s.pgd_steps,
                                             "step_size": default_step_size(eps, s.pgd_steps),
                                             "gradient": grad, "n": m}, x_adv))
    a = min(s.adaptive_n, len(x))
    if detector is not None and model.is_deq and a > 0:
        from .detector_attack import detector_aware_pgd

        name = f"detector-aware-lam{s.adaptive_lambda:g}"
        folder = _cache(s, sha256, x[:a])
        folder = None if folder is None else (
            folder / f"{name}-steps{s.adaptive_steps}-eps{eps:g}-s{seed}")
        x_da = cached_chunks(
            folder, a, lambda i, j: detector_aware_pgd(
                model, detector, x[i:j], y[i:j], eps=eps, lam=s.adaptive_lambda,
                steps=s.adaptive_steps, seed=seed * 1_000_003 + i),
            chunk=10, label=name, log=log).to(x.device)
        out.append((name, {"attack": "detector-aware pgd", "eps": eps, "lambda":
                           s.adaptive_lambda, "steps": s.adaptive_steps,
                           "gradient": "exact (solver iterations and features)", "n": a}, x_da))
    return out


def selective_section(model: Classifier, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor,
                      s: SelectiveSettings, *, measure: bool, eps: float, batch_size: int,
                      seed: int, sha256: str, detector: Any = None,
                      log: Log = lambda m: None) -> SelectiveSection:
    """The report's selective section: the measurements (`measure`) and/or the calibration."""
    skipped = []
    usable = detector is not None and model.is_deq
    headed = getattr(model, "rectifier", None) is not None
    names = [n for n in dict.fromkeys(s.scores)
             if (n != "detector" or usable) and (n != "rectified" or headed)]
    if "detector" in s.scores and not usable:
        skipped.append("detector score and detector-aware attack: the checkpoint has no learned "
                       "detector (deqguard detect fit CKPT --write)")
    if "rectified" in s.scores and not headed and tuple(s.scores) != SCORE_NAMES:
        # asked for by name; the default list just has no such score on a plain checkpoint
        skipped.append("rectified score: the checkpoint has no rectifier head (deqguard train "
                       "with model.overrides.rectifier)")
    if s.calibrate and s.score not in names:
        if s.score == "detector" and not usable:
            raise ValueError("--selective-score detector needs a learned detector in the "
                             "checkpoint (deqguard detect fit CKPT --write)")
        if s.score == "rectified" and not headed:
            raise ValueError("--selective-score rectified needs a checkpoint with a rectifier "
                             "head")
        names.append(s.score)
    if not measure:
        names = [s.score]
    yv = y_val.cpu().numpy()
    val = score_inputs(model, x_val, names, detector, batch_size=batch_size)
    pairs = {n: coverage_threshold(val.scores[n], s.target_coverage) for n in names}
    section = SelectiveSection(
        scores=names, target_coverage=s.target_coverage, n_val=len(yv),
        val_accuracy=float(np.mean(val.pred == yv)),
        val_thresholds={n: t for n, (t, _) in pairs.items()},
        val_realised={n: r for n, (_, r) in pairs.items()}, bootstrap_reps=s.reps,
        skipped=skipped)
    if s.calibrate:
        section.calibration = calibration(model, val, yv, s, sha256=sha256,
                                          detector=detector).model_dump(mode="json")
    if not measure:
        return section
    thresholds = dict(section.val_thresholds)
    yt = y.cpu().numpy()
    clean = score_inputs(model, x, names, detector, batch_size=batch_size)
    section.kinds.append(judge_kind("clean", clean, yt, thresholds, clean_correct=None,
                                    reps=s.reps, seed=seed))
    clean_ok = clean.pred == yt
    for name, spec, x_adv in attacked_sets(model, x, y, s, eps=eps, seed=seed, sha256=sha256,
                                           detector=detector if usable else None, log=log):
        m = len(x_adv)
        scored = score_inputs(model, x_adv, names, detector, batch_size=batch_size)
        section.kinds.append(judge_kind(name, scored, yt[:m], thresholds,
                                        clean_correct=clean_ok[:m], reps=s.reps, seed=seed,
                                        attack=spec))
    return section
