"""The doubt parts of an evaluation: attack detection from the solver trajectory (and the
checkpoint's learned detector), and selective answers. Both score the inputs the robustness
parts already attacked, so the numbers describe the same attacks as the robust accuracy."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .attacks import run_attack
from .detection import (
    calibrate,
    detect_attack,
    fit_logistic,
    score_all,
    solve_all,
    subset,
    trajectory_summary,
)
from .schema import DetectionSection
from .state import EvalState


def detection(ev: EvalState) -> None:
    s, bs = ev.s, ev.s.batch_size
    assert ev.clean_main is not None and ev.clean_correct is not None
    names = list(s.detect_scores)
    params: dict[str, dict] = {}
    val_clean = None
    if ev.x_val is not None:
        val_clean = solve_all(ev.solve_main, ev.x_val, bs)
        if s.logistic:
            spec = ev.primary_spec()
            x_adv, _ = run_attack(ev.model, spec, ev.x_val, ev.y_val,
                                  ev.predict_main, defense=ev.defense_cfg,
                                  batch_size=bs, generator=ev.generator())
            val_adv = solve_all(ev.solve_main, x_adv, bs)
            params["logistic"] = fit_logistic(val_clean, val_adv)
            names.append("logistic")
    clean_scores = score_all(ev.clean_main, names, s.early_index, params)
    learned = _learned_scores(ev)
    if learned is not None:
        clean_scores["learned_detector"] = learned(ev.x)
    val_thresholds = None
    if val_clean is not None:
        from deqguard.models.detection_scores import calibrate_threshold

        val_scores = score_all(val_clean, names, s.early_index, params)
        if learned is not None:
            val_scores["learned_detector"] = learned(ev.x_val)
        val_thresholds = {k: calibrate_threshold(v, s.fpr) for k, v in val_scores.items()}
    clean_ok = ev.clean_correct.cpu().numpy()
    sets = dict(ev.x_adv)
    if ev.report.autoattack is not None:
        sets["autoattack"] = ev.aa_x_adv
    det_attacks, trajs = [], [trajectory_summary("clean", ev.clean_main)]
    for name, xa in sets.items():
        res = solve_all(ev.solve_main, xa, bs)
        m = len(xa)
        fooled = (res.logits.argmax(1) != ev.y[:m]).cpu().numpy()
        successful = clean_ok[:m] & fooled
        adv_scores = score_all(res, names, s.early_index, params)
        if learned is not None:
            adv_scores["learned_detector"] = learned(xa)
        det_attacks.append(detect_attack(name, clean_scores, adv_scores, successful, s.fpr,
                                         val_thresholds))
        mask = torch.from_numpy(successful) if successful.any() else torch.ones(m, dtype=bool)
        trajs.append(trajectory_summary(name, subset(res, mask.to(res.logits.device))))
    scored = names + (["learned_detector"] if learned is not None else [])
    section = DetectionSection(scores=scored, early_index=s.early_index, fpr=s.fpr,
                               attacks=det_attacks, trajectories=trajs,
                               logistic=params.get("logistic"))
    if val_clean is not None and s.calibration_score in names:
        want = ev.primary_spec().name
        primary = next((a for a in det_attacks if a.attack == want), None)
        sc = primary.scores[s.calibration_score] if primary else None
        cal = calibrate(val_clean, s.calibration_score, s.fpr, early_index=s.early_index,
                        params=params.get(s.calibration_score),
                        auroc=sc.auroc if sc else None,
                        tpr=sc.tpr_at_val_threshold if sc else None,
                        attack=primary.attack if primary else None, eps=s.eps,
                        defense=s.defense,
                        defense_config=(ev.defense_cfg.model_dump()
                                        if ev.defense_cfg else None))
        section.calibration = cal.model_dump(mode="json")
        section.clean_test_fpr_at_val_threshold = float(
            np.mean(clean_scores[s.calibration_score] > cal.threshold))
    ev.report.detection = section


def selective(ev: EvalState) -> None:
    """Risk-coverage of the doubt scores and/or the selective calibration (selective.py)."""
    from .schema import SelectiveSettings
    from .selective import selective_section

    if ev.defended:
        ev.warn("the selective part measures the plain solve (what the server answers "
                "selectively); it was skipped under --defense")
        return
    if ev.x_val is None or ev.y_val is None:
        raise ValueError("the selective part needs the validation split (x_val, y_val)")
    log = ((lambda m: print(m, file=sys.stderr, flush=True)) if ev.progress
           else (lambda m: None))
    ev.report.selective = selective_section(
        ev.model, ev.x, ev.y, ev.x_val, ev.y_val,
        ev.s.selective or SelectiveSettings(), measure="selective" in ev.s.parts,
        eps=ev.s.eps, batch_size=ev.s.batch_size, seed=ev.s.seed,
        sha256=ev.ckpt.sha256, detector=ev.learned_detector, log=log)


def _learned_scores(ev: EvalState) -> Callable[[Tensor], np.ndarray] | None:
    """x -> the checkpoint's learned detector scores (its dynamics features per image)."""
    det = ev.learned_detector
    if det is None or ev.defended or not ev.model.is_deq:
        return None
    from .detector_fit import compute_features, score_features

    return lambda x: score_features(det, compute_features(ev.model, x, det.dynamics,
                                                          batch_size=ev.s.batch_size))
