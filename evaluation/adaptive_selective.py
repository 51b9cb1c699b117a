"""The adaptive-selective part of `deqguard eval`: what each served doubt score is worth against
an attacker who aims at a wrong answer that the score lets through (selective_attack.py).

Protocol, per score and per coverage (0.8 and 0.9 by default):
- the threshold is the served one when the checkpoint's selective calibration is of this score,
  else set the same way (`coverage_threshold`) on the --val-n clean validation images;
- the attack runs on the first --n test images; coverages are attacked in increasing order and a
  higher coverage's attack starts from the lower one's result (its threshold answers at least as
  much, so a wrong answer let through at 0.8 is one at 0.9 too);
- every number is judged on the real pipeline: the served solve and `doubt_score`
  (selective.py's `score_inputs`), never on the attack's surrogate;
- PGD (40 steps, exact gradient) on the same images is the baseline: an aimed attack that
  misclassifies fewer images than PGD is marked weaker, as it then leaves errors on the table.
Crafted sets are cached per chunk of images under --selective-cache (a killed run resumes).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import Classifier
from deqguard.models.selective import coverage_threshold

from .adaptive_selective_schema import (
    AdaptiveSelectiveRow,
    AdaptiveSelectiveSection,
    AdaptiveSelectiveSettings,
)
from .bootstrap import bootstrap_many
from .risk_coverage import answered_stats, augrc, aurc
from .selective import score_inputs
from .selective_attack import DEQ_ONLY, Best, Goal, judge, selective_attack

Log = Callable[[str], None]
CHUNK = 20  # images per cached piece of an attacked set


def _num(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def score_stats(clean_doubt: np.ndarray, clean_correct: np.ndarray, adv_doubt: np.ndarray,
                adv_correct: np.ndarray, threshold: float) -> dict[str, float]:
    """The row's numbers for one set of images, clean and attacked (paired by index); NaN
    where undefined (nothing answered, no successful attack)."""
    clean = answered_stats(clean_doubt, clean_correct, threshold)
    successful = np.asarray(clean_correct, bool) & ~np.asarray(adv_correct, bool)
    adv = answered_stats(adv_doubt, adv_correct, threshold, successful)
    answered = np.asarray(adv_doubt, np.float64) <= threshold
    return {
        "clean_coverage": clean["coverage"],
        "clean_accuracy_answered": clean["accuracy_answered"],
        "attack_error_rate": float(np.mean(~np.asarray(adv_correct, bool))),
        "attacked_coverage": adv["coverage"],
        "attacked_accuracy_answered": adv["accuracy_answered"],
        "successful_answered": adv["successful_answered"],
        "wrong_answered": float(np.mean(answered & ~np.asarray(adv_correct, bool))),
        "aurc_clean": aurc(clean_doubt, clean_correct),
        "augrc_clean": augrc(clean_doubt, clean_correct),
        "aurc_attacked": aurc(adv_doubt, adv_correct),
        "augrc_attacked": augrc(adv_doubt, adv_correct),
    }


def row_numbers(clean_doubt: np.ndarray, clean_correct: np.ndarray, adv_doubt: np.ndarray,
                adv_correct: np.ndarray, threshold: float, *, reps: int, seed: int
                ) -> dict[str, Any]:
    """`score_stats` with a bootstrap interval `<key>_ci` for each (images resampled with
    their clean and attacked scores together), and the count of successful attacks."""
    arrays = [np.asarray(a) for a in (clean_doubt, clean_correct, adv_doubt, adv_correct)]
    point = score_stats(*arrays, threshold)
    ci = bootstrap_many(lambda cd, cc, ad, ac: score_stats(cd, cc, ad, ac, threshold),
                        [arrays], reps=reps, seed=seed)
    out: dict[str, Any] = {k: _num(v) for k, v in point.items()}
    out.update({f"{k}_ci": ci[k] for k in point})
    out["n_successful"] = int((arrays[1].astype(bool) & ~arrays[3].astype(bool)).sum())
    return out


def thresholds(names: list[str], coverages: list[float], stored: Any,
               val_scores: dict[str, np.ndarray]) -> dict[tuple[str, float], tuple[float, str]]:
    """{(score, coverage): (threshold, source)}: the served calibration's where it is of this
    score, else the clean-validation quantile."""
    out = {}
    for name in names:
        for c in coverages:
            if (stored is not None and stored.score == name
                    and stored.coverage_problem(c) is None):
                out[name, c] = (float(stored.threshold(c)), "checkpoint")
            else:
                out[name, c] = (coverage_threshold(val_scores[name], c)[0], "validation")
    return out


def _folder(cache: str | None, sha256: str, x: Tensor) -> Path | None:
    if cache is None:
        return None
    h = hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:12]
    return Path(cache) / sha256[:16] / f"adaptive-selective-{len(x)}-{h}"


def _attacked(model: Classifier, x: Tensor, y: Tensor, goal: Goal, s: AdaptiveSelectiveSettings,
              *, eps: float, seed: int, start_from: Tensor | None, folder: Path | None,
              label: str, log: Log) -> Tensor:
    """The attacked set for `goal`, chunk by chunk (cached when `folder` is set)."""
    from .advsets import cached_chunks

    def make(i: int, j: int) -> Tensor:
        best = None
        if start_from is not None:
            xs = start_from[i:j].to(x.device)
            tier, progress = judge(model, xs, y[i:j], goal)
            best = Best(xs.clone(), tier, progress,
                        torch.full_like(tier, -1))
        return selective_attack(model, x[i:j], y[i:j], goal, eps=eps, iters=s.iters,
                                restarts=s.restarts, targets=s.targets, loss=s.loss,
                                seed=seed * 1_000_003 + i, best=best).x

    return cached_chunks(folder, len(x), make, chunk=CHUNK, label=label, log=log).to(x.device)


def _pgd_baseline(model: Classifier, x: Tensor, y: Tensor, s: AdaptiveSelectiveSettings, *,
                  eps: float, seed: int, folder: Path | None, log: Log
                  ) -> tuple[dict[str, Any], Tensor]:
    from .advsets import CraftSpec, craft
    from .attacks import default_step_size

    grad = s.pgd_gradient if model.is_deq else "direct"
    spec = CraftSpec("pgd", eps, s.pgd_steps, "test", 0, len(x), seed=seed, gradient=grad)
    x_adv = craft(model, spec, x, y, folder, log=log).to(x.device)
    info = {"name": f"pgd{s.pgd_steps}-{grad}", "attack": "pgd", "eps": eps,
            "steps": s.pgd_steps, "step_size": default_step_size(eps, s.pgd_steps),
            "gradient": grad, "n": len(x)}
    return info, x_adv


def usable_scores(model: Classifier, names: list[str], detector: Any) -> tuple[list[str],
                                                                               list[str]]:
    """(scores to attack, reasons for those skipped)."""
    keep, skipped = [], []
    for n in dict.fromkeys(names):
        if n == "detector" and (detector is None or not model.is_deq):
            skipped.append("detector: the checkpoint has no learned detector (deqguard detect "
                           "fit CKPT --write)")
        elif n == "rectified" and getattr(model, "rectifier", None) is None:
            skipped.append("rectified: the checkpoint has no rectifier head (deqguard train "
                           "--set model.overrides.rectifier.hidden=64 ...)")
        elif n in DEQ_ONLY and not model.is_deq:
            skipped.append(f"{n}: a feedforward model has no solver path")
        else:
            keep.append(n)
    return keep, skipped


def adaptive_selective_section(model: Classifier, x: Tensor, y: Tensor, x_val: Tensor | None,
                               s: AdaptiveSelectiveSettings, *, eps: float, batch_size: int,
                               seed: int, sha256: str, stored: Any = None,
                               detector: Any = None, log: Log = lambda m: None
                               ) -> AdaptiveSelectiveSection:
    """Attack every usable score at every coverage; the report's section."""
    names, skipped = usable_scores(model, s.scores, detector)
    coverages = sorted(set(s.coverages))
    need_val = [n for n in names if stored is None or stored.score != n]
    if need_val and x_val is None:
        raise ValueError("the adaptive-selective part needs validation images for the "
                         f"thresholds of {need_val}")
    val = score_inputs(model, x_val, need_val, detector, batch_size=batch_size) if need_val \
        else None
    taus = thresholds(names, coverages, stored, val.scores if val else {})
    yt = y.cpu().numpy()
    clean = score_inputs(model, x, names, detector, batch_size=batch_size)
    clean_ok = clean.pred == yt
    folder = _folder(s.cache, sha256, x)
    pgd_info, x_pgd = _pgd_baseline(model, x, y, s, eps=eps, seed=seed, folder=folder, log=log)
    pgd_pred = score_inputs(model, x_pgd, [], None, batch_size=batch_size).pred
    pgd_info["error_rate"] = float(np.mean(pgd_pred != yt))
    section = AdaptiveSelectiveSection(
        n=len(yt), eps=eps, clean_accuracy=float(clean_ok.mean()),
        n_val=None if x_val is None else len(x_val),
        served_score=None if stored is None else stored.score, pgd=pgd_info,
        skipped=skipped, bootstrap_reps=s.reps)
    spec = {"attack": "adaptive-selective apgd", "eps": eps, "iters": s.iters,
            "restarts": s.restarts, "targets": s.targets, "loss": s.loss,
            "gradient": "exact" if model.is_deq else "direct"}
    for si, name in enumerate(names):
        previous = None
        for ci, c in enumerate(coverages):
            tau, source = taus[name, c]
            goal = Goal(name, tau, detector)
            label = f"{name}-c{c:g}"
            sub = None if folder is None else folder / (
                f"{label}-it{s.iters}-r{s.restarts}-t{s.targets}-{s.loss}-eps{eps:g}-s{seed}")
            t0 = time.perf_counter()
            x_adv = _attacked(model, x, y, goal, s, eps=eps, seed=seed + 7919 * si + 31 * ci,
                              start_from=previous, folder=sub, label=label, log=log)
            seconds = time.perf_counter() - t0
            previous = x_adv
            adv = score_inputs(model, x_adv, [name], detector, batch_size=batch_size)
            nums = row_numbers(clean.scores[name], clean_ok, adv.scores[name], adv.pred == yt,
                               tau, reps=s.reps, seed=seed)
            section.rows.append(AdaptiveSelectiveRow(
                score=name, coverage=c, threshold=tau, threshold_source=source,
                attack={**spec, "start": "coverage "
                        f"{coverages[ci - 1]:g}'s result" if ci else "random"},
                pgd_error_rate=pgd_info["error_rate"],
                weaker_than_pgd=nums["attack_error_rate"] < pgd_info["error_rate"],
                seconds=seconds, **nums))
    section.best = best_scores(section.rows)
    return section


def best_scores(rows: list[AdaptiveSelectiveRow]) -> dict[str, str]:
    """Per coverage the score that holds best under its own attack: highest accuracy among the
    answered attacked images, then the fewest wrong answers given."""
    out: dict[str, str] = {}
    for c in sorted({r.coverage for r in rows}):
        ranked = [(r.attacked_accuracy_answered, -r.wrong_answered, r.score) for r in rows
                  if r.coverage == c and r.attacked_accuracy_answered is not None]
        if ranked:
            out[f"{c:g}"] = max(ranked)[2]
    return out


def part(ev: Any) -> None:
    """The part on an evaluation's state (runner.py): the plain solve, what the server answers
    selectively; skipped under --defense like the selective part."""
    import sys

    from deqguard.models import read_metadata
    from deqguard.models.learned_detector import detector_from_metadata
    from deqguard.models.selective import selective_from_metadata

    if ev.defended:
        ev.warn("the adaptive-selective part attacks the plain solve (what the server answers "
                "selectively); it was skipped under --defense")
        return
    meta = read_metadata(ev.ckpt.path)
    detector = ev.learned_detector or detector_from_metadata(meta)
    log = ((lambda m: print(m, file=sys.stderr, flush=True)) if ev.progress
           else (lambda m: None))
    ev.report.adaptive_selective = adaptive_selective_section(
        ev.model, ev.x, ev.y, ev.x_val, ev.s.adaptive_selective or AdaptiveSelectiveSettings(),
        eps=ev.s.eps, batch_size=ev.s.batch_size, seed=ev.s.seed, sha256=ev.ckpt.sha256,
        stored=selective_from_metadata(meta), detector=detector, log=log)
    for r in ev.report.adaptive_selective.rows:
        if r.weaker_than_pgd:
            ev.warn(f"the adaptive-selective attack on {r.score} at coverage {r.coverage:g} "
                    f"misclassifies {r.attack_error_rate:.1%} of the images, PGD "
                    f"{r.pgd_error_rate:.1%}: weaker than PGD on these images")
