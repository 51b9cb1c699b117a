"""The rectifier-aware part of `deqguard eval`: the rectified doubt score (models/rectifier.py)
against attacks aimed at its head, and the answers it gives up to a doubt-raising nudge.

A doubt score looks good under attack if it abstains on attacked inputs; it can do that by
doubting everything near the data, which a selective answer pays for in abstentions on clean
inputs that a small nudge tips over the threshold. So the part measures both:
- attacks (rectifier_attack.py, exact gradient through the solver) on the first --n test
  images: PGD on CE + lam x BCE(R, stopgrad p_y) per lam, and a targeted PGD on
  log p_t + log sigmoid(A) towards each of the top wrong classes t of the clean logits; per
  image the worst case over those sets (wrong and answered, else wrong with the lowest doubt,
  else right with the highest); all judged on the served solve and score at the thresholds
  that answer the given clean coverages (the checkpoint's calibration where it is of the
  score, else set on --val-n clean validation images), against PGD (--selective-pgd-steps)
  on the same images, judged on both rectified and max_softmax;
- over-rejection: per score (rectified, max_softmax), a PGD within eps x over_rejection_eps
  that raises the doubt while the served answer stays the same; the share of clean inputs it
  moves from answered to abstained at the same thresholds.
Crafted sets are cached per chunk under --selective-cache (a killed run resumes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import Classifier

from .adaptive_selective import _folder, _pgd_baseline, row_numbers, thresholds
from .bootstrap import bootstrap_many
from .rectifier_eval_schema import (
    OverRejectionRow,
    RectifierAttackRow,
    RectifierEvalSection,
    RectifierEvalSettings,
)
from .selective import score_inputs

Log = Callable[[str], None]
CHUNK = 20
SCORES = ["rectified", "max_softmax"]


def worst_case(doubts: np.ndarray, preds: np.ndarray, y: np.ndarray, threshold: float
               ) -> np.ndarray:
    """Per image [N] the index of the worst of A attacked candidates ([A, N] doubts and answers)
    at `threshold`: a wrong answer that is answered, else a wrong answer with the lowest doubt,
    else a right answer with the highest doubt (the nearest to an abstention)."""
    d = np.asarray(doubts, np.float64)
    wrong = np.asarray(preds) != np.asarray(y)[None, :]
    tier = wrong.astype(np.int64) * (1 + (d <= threshold))
    within = np.where(wrong, -d, d)
    out = np.empty(d.shape[1], dtype=np.int64)
    for i in range(d.shape[1]):
        out[i] = max(range(d.shape[0]), key=lambda a: (tier[a, i], within[a, i]))
    return out


def over_rejection(clean_doubt: np.ndarray, clean_pred: np.ndarray, nudged_doubt: np.ndarray,
                   nudged_pred: np.ndarray, y: np.ndarray, threshold: float
                   ) -> dict[str, float]:
    """What a doubt-raising nudge costs at `threshold` (answer when doubt <= threshold): the
    share of all images answered clean and abstained on after the nudge with the same answer
    (`pushed_out`), the same over the clean-answered ones, and the share of all images whose
    correct clean answer is lost that way (`correct_pushed_out`)."""
    cd, nd = np.asarray(clean_doubt, np.float64), np.asarray(nudged_doubt, np.float64)
    kept = np.asarray(nudged_pred) == np.asarray(clean_pred)
    answered = cd <= threshold
    pushed = answered & kept & (nd > threshold)
    correct = np.asarray(clean_pred) == np.asarray(y)
    return {
        "clean_coverage": float(answered.mean()),
        "nudged_coverage": float((nd <= threshold).mean()),
        "answer_kept": float(kept.mean()),
        "pushed_out": float(pushed.mean()),
        "pushed_out_of_answered": float(pushed[answered].mean()) if answered.any()
        else float("nan"),
        "correct_pushed_out": float((pushed & correct).mean()),
    }


def _num(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def _attack_row(score: str, attack: str, c: float, tau: tuple[float, str], clean: Any,
                clean_ok: np.ndarray, adv_doubt: np.ndarray, adv_ok: np.ndarray,
                pgd_error: float, reps: int, seed: int) -> RectifierAttackRow:
    nums = row_numbers(clean.scores[score], clean_ok, adv_doubt, adv_ok, tau[0], reps=reps,
                       seed=seed)
    keep = ("clean_coverage", "clean_accuracy_answered", "attack_error_rate",
            "attack_error_rate_ci", "attacked_coverage", "attacked_accuracy_answered",
            "attacked_accuracy_answered_ci", "n_successful", "successful_answered",
            "successful_answered_ci", "wrong_answered", "wrong_answered_ci")
    return RectifierAttackRow(
        score=score, attack=attack, coverage=c, threshold=tau[0], threshold_source=tau[1],
        pgd_error_rate=pgd_error, weaker_than_pgd=nums["attack_error_rate"] < pgd_error,
        **{k: nums[k] for k in keep})


def _crafted(model: Classifier, x: Tensor, folder: Path | None, label: str, log: Log,
             make: Callable[[int, int], Tensor]) -> Tensor:
    from .advsets import cached_chunks

    return cached_chunks(folder, len(x), make, chunk=CHUNK, label=label, log=log).to(x.device)


def rectifier_section(model: Classifier, x: Tensor, y: Tensor, x_val: Tensor | None,
                      s: RectifierEvalSettings, *, eps: float, batch_size: int, seed: int,
                      sha256: str, stored: Any = None, log: Log = lambda m: None
                      ) -> RectifierEvalSection:
    """Run the requested attacks on a model with a rectifier head; the report's section."""
    from .rectifier_attack import doubt_raising_pgd, multi_targeted_pgd, rectifier_aware_pgd
    from .selective_attack import top_wrong_classes

    head = getattr(model, "rectifier", None)
    if head is None:
        raise ValueError("the rectifier-aware part needs a checkpoint with a rectifier head")
    coverages = sorted(set(s.coverages))
    need_val = [n for n in SCORES if stored is None or stored.score != n]
    if need_val and x_val is None:
        raise ValueError("the rectifier-aware part needs validation images for the thresholds")
    val = score_inputs(model, x_val, need_val, batch_size=batch_size) if need_val else None
    taus = thresholds(SCORES, coverages, stored, val.scores if val else {})
    yt = y.cpu().numpy()
    clean = score_inputs(model, x, SCORES, batch_size=batch_size)
    clean_ok = clean.pred == yt
    folder = _folder(s.cache, sha256, x)
    sub = (lambda name: None) if folder is None else (
        lambda name: folder / f"rect-{name}-st{s.steps}-eps{eps:g}-s{seed}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pgd_info, x_pgd = _pgd_baseline(model, x, y, s, eps=eps, seed=seed, folder=folder, log=log)
    seconds[pgd_info["name"]] = time.perf_counter() - t0
    pgd_scored = score_inputs(model, x_pgd, SCORES, batch_size=batch_size)
    pgd_error = float(np.mean(pgd_scored.pred != yt))
    pgd_info["error_rate"] = pgd_error
    section = RectifierEvalSection(
        n=len(yt), eps=eps, clean_accuracy=float(clean_ok.mean()),
        n_val=None if x_val is None else len(x_val),
        served_score=None if stored is None else stored.score,
        head_trajectory=int(head.config.trajectory), pgd=pgd_info,
        attack={"steps": s.steps, "lambdas": s.lambdas, "targets": s.targets,
                "gradient": "exact", "start": "uniform", "attacks": s.attacks,
                "over_rejection_eps": s.over_rejection_eps * eps},
        bootstrap_reps=s.reps)

    def row(score: str, attack: str, c: float, doubt: np.ndarray, pred: np.ndarray) -> None:
        section.rows.append(_attack_row(score, attack, c, taus[score, c], clean, clean_ok,
                                        doubt, pred == yt, pgd_error, s.reps, seed))

    for c in coverages:
        for name in SCORES:
            row(name, pgd_info["name"], c, pgd_scored.scores[name], pgd_scored.pred)

    sets: list[tuple[str, Tensor]] = []
    if "lam-pgd" in s.attacks:
        for li, lam in enumerate(s.lambdas):
            t0 = time.perf_counter()
            xs = _crafted(model, x, sub(f"lam{lam:g}"), f"rectifier lam {lam:g}", log,
                          lambda i, j, lam=lam, li=li: rectifier_aware_pgd(
                              model, x[i:j], y[i:j], eps=eps, lam=lam, steps=s.steps,
                              seed=seed * 1_000_003 + 101 * li + i))
            seconds[f"lam{lam:g}"] = time.perf_counter() - t0
            sets.append((f"lam{lam:g}", xs))
    if "multi-targeted" in s.attacks:
        k = min(s.targets, int(model.config.num_classes) - 1)
        t0 = time.perf_counter()
        xs = _crafted(model, x, sub(f"targeted{k}"), f"rectifier targeted x{k}", log,
                      lambda i, j: torch.stack(multi_targeted_pgd(
                          model, x[i:j], top_wrong_classes(model, x[i:j], y[i:j], k), eps=eps,
                          steps=s.steps, seed=seed * 1_000_003 + 7 + i), dim=1))
        seconds[f"targeted{k}"] = time.perf_counter() - t0
        sets += [(f"target{j + 1}", xs[:, j]) for j in range(k)]

    if sets:
        scored = [score_inputs(model, xs, ["rectified"], batch_size=batch_size)
                  for _, xs in sets]
        doubts = np.stack([sc.scores["rectified"] for sc in scored])
        preds = np.stack([sc.pred for sc in scored])
        for c in coverages:
            for (name, _), d, p in zip(sets, doubts, preds, strict=True):
                row("rectified", name, c, d, p)
            pick = worst_case(doubts, preds, yt, taus["rectified", c][0])
            cols = np.arange(len(yt))
            row("rectified", "worst-case", c, doubts[pick, cols], preds[pick, cols])

    if "over-rejection" in s.attacks:
        small = s.over_rejection_eps * eps
        label = torch.as_tensor(clean.pred, device=x.device)
        for si, name in enumerate(SCORES):
            t0 = time.perf_counter()
            xs = _crafted(model, x, sub(f"nudge-{name}-r{s.over_rejection_eps:g}"),
                          f"doubt-raising nudge on {name}", log,
                          lambda i, j, name=name, si=si: doubt_raising_pgd(
                              model, x[i:j], label[i:j], name, eps=small, steps=s.steps,
                              seed=seed * 1_000_003 + 13 * si + i))
            seconds[f"nudge-{name}"] = time.perf_counter() - t0
            nudged = score_inputs(model, xs, [name], batch_size=batch_size)
            for c in coverages:
                tau, source = taus[name, c]
                arrays = [clean.scores[name], clean.pred, nudged.scores[name], nudged.pred, yt]
                point = over_rejection(*arrays, tau)
                ci = bootstrap_many(lambda *a, tau=tau: over_rejection(*a, tau), [arrays],
                                    reps=s.reps, seed=seed)
                section.over_rejection.append(OverRejectionRow(
                    score=name, coverage=c, threshold=tau, threshold_source=source, eps=small,
                    pushed_out_ci=ci["pushed_out"],
                    correct_pushed_out_ci=ci["correct_pushed_out"],
                    **{k: (_num(v) if k == "pushed_out_of_answered" else v)
                       for k, v in point.items()}))
    section.seconds = seconds
    return section


def part(ev: Any) -> None:
    """The part on an evaluation's state (runner.py): the plain solve; skipped under --defense
    and on a checkpoint without a rectifier head, with a warning."""
    import sys

    from deqguard.models import read_metadata
    from deqguard.models.selective import selective_from_metadata

    if ev.defended:
        ev.warn("the rectifier-aware part attacks the plain solve; it was skipped under "
                "--defense")
        return
    if getattr(ev.model, "rectifier", None) is None:
        ev.warn("the rectifier-aware part was skipped: the checkpoint has no rectifier head "
                "(deqguard train --set model.overrides.rectifier.hidden=64 ...)")
        return
    meta = read_metadata(ev.ckpt.path)
    log = ((lambda m: print(m, file=sys.stderr, flush=True)) if ev.progress
           else (lambda m: None))
    sec = rectifier_section(
        ev.model, ev.x, ev.y, ev.x_val, ev.s.rectifier or RectifierEvalSettings(),
        eps=ev.s.eps, batch_size=ev.s.batch_size, seed=ev.s.seed, sha256=ev.ckpt.sha256,
        stored=selective_from_metadata(meta), log=log)
    ev.report.rectifier = sec
    for r in sec.rows:
        if r.attack == "worst-case" and r.weaker_than_pgd:
            ev.warn(f"the rectifier-aware worst case at coverage {r.coverage:g} misclassifies "
                    f"{r.attack_error_rate:.1%} of the images, PGD {r.pgd_error_rate:.1%}: "
                    "weaker than PGD on these images")
