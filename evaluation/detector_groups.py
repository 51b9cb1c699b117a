"""What each group of dynamics features buys the learned detector, next to what it costs.

A served request with detection pays for every feature its detector reads (models/dynamics.py,
costs in f evaluations), so a feature group earns its place only if the detector catches more
attacks with it. Each group is a `DynamicsConfig` with the other groups switched off, so its
price is what serving would pay. Its detector is fitted, calibrated and tested on the same sets as
every other group, with the protocol of `detector_fit`: fitted on clean vs attacked validation
images, the threshold calibrated at the asked FPR on other clean validation images, measured on
test images (clean ones against the successful attacks of each test attack), paired bootstrap
intervals against the full set. A feature's value does not depend on which others are computed
(each draws its own fixed pattern), so the features are computed once, with the full set, and each
group reads its own columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from deqguard.models.classifier import Classifier
from deqguard.models.dynamics import DynamicsConfig

from .advsets import VAL_MIX, CraftSpec, block_plan, craft, split_images, with_gradient
from .detector_fit import (
    Features,
    bootstrap,
    build_detector,
    cached_features,
    paired_difference,
    score_features,
)

# name -> (the groups switched on besides the free trajectory features, what it adds)
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "trajectory": ((), "baselines + trajectory statistics of the solve itself (free)"),
    "residual": (("residual",), "+ log_residual"),
    "restart": (("restart",), "+ restart_shift, restart_flip, restart_entropy"),
    "entropy-step": (("entropy_step",), "+ entropy_step_drop"),
    "jacobian": (("residual", "jacobian"), "+ log_residual, jacobian_rms (one f evaluation)"),
    "residual+entropy-step": (("residual", "entropy_step"), "+ log_residual, entropy_step_drop"),
    "all-but-restart": (("residual", "jacobian", "entropy_step"),
                        "+ log_residual, jacobian_rms, entropy_step_drop"),
    "all": (("residual", "jacobian", "restart", "entropy_step"), "every group"),
}
REFERENCE = "all"
IMAGES = Callable[[str, int, int], tuple[Tensor, Tensor]]


def group_config(name: str, base: DynamicsConfig | None = None) -> DynamicsConfig:
    """`base` (default: DynamicsConfig()) with only the named group's features switched on.

    A part that `base` switched off comes back at the default setting, so every group can be
    priced whatever the base; a part it sets keeps its setting.
    """
    if name not in GROUPS:
        raise ValueError(f"unknown feature group {name!r}; known: {', '.join(GROUPS)}")
    base = base or DynamicsConfig()
    default = DynamicsConfig()
    on = set(GROUPS[name][0])
    return base.model_copy(update={
        "log_residual": "residual" in on,
        "jacobian_vjps": (base.jacobian_vjps or default.jacobian_vjps) if "jacobian" in on else 0,
        "power_iters": base.power_iters if "jacobian" in on else 0,
        "restart_iters": (base.restart_iters or default.restart_iters) if "restart" in on else 0,
        "entropy_step": (base.entropy_step or default.entropy_step)
        if "entropy_step" in on else 0.0,
    })


def group_configs(base: DynamicsConfig | None = None) -> dict[str, DynamicsConfig]:
    return {name: group_config(name, base) for name in GROUPS}


@dataclass
class DetectionSets:
    """Features of every set the groups are fitted, calibrated and measured on."""

    fit_clean: Features
    fit_adv: Features
    cal_clean: Features
    test_clean: Features
    test_adv: dict[str, Features]  # attack name -> features of the attacked test images
    y_test: np.ndarray
    described: dict[str, Any]


def attacks_on_test(n: int, *, eps: float = 0.1, steps: int = 40, lam: float = 0.1,
                 gradient: str = "exact") -> dict[str, tuple[CraftSpec, ...]]:
    """The two test attacks on the first n test images, in cached blocks: PGD-40 and the
    low-entropy PGD-40 (misclassify, then lower the summed trajectory entropy)."""
    return {
        f"pgd{steps}": block_plan((CraftSpec("pgd", eps, steps, "test", 0, 0,
                                             gradient=gradient),), n),
        f"pgd{steps}-lowent": block_plan((CraftSpec("pgd-lowent", eps, steps, "test", 0, 0,
                                                    gradient=gradient, lam=lam),), n),
    }


def _crafted(model: Classifier, plan: tuple[CraftSpec, ...], cache: Path, images: IMAGES,
             log: Callable[[str], None]) -> Tensor:
    import torch

    parts = []
    for spec in plan:
        x, y = images(spec.split, spec.start, spec.count)
        parts.append(craft(model, spec, x, y, cache, log=log))
    return torch.cat(parts)


def collect_sets(model: Classifier, cache: str | Path, cfg: DynamicsConfig, *, n_fit: int,
                 n_cal: int, n_test: int, lam: float = 0.1, gradient: str = "exact",
                 images: IMAGES = split_images, log: Callable[[str], None] = print
                 ) -> DetectionSets:
    """Craft (or reuse from `cache`) every attacked set and compute (or reuse) its features.

    Validation: images [0, n_fit) clean and attacked with the VAL_MIX blocks (fitting), images
    [n_fit, n_fit + n_cal) clean (threshold). Test: images [0, n_test) clean and under each of
    `attacks_on_test`.
    """
    cache = Path(cache)
    feats = cache / "features"
    val_plan = with_gradient(block_plan(VAL_MIX, n_fit), gradient)
    x_fit, _ = images("val", 0, n_fit)
    x_fit_adv = _crafted(model, val_plan, cache / "adv", images, log)
    x_cal, _ = images("val", n_fit, n_cal)
    x_test, y_test = images("test", 0, n_test)
    attacks = attacks_on_test(n_test, lam=lam, gradient=gradient)
    test_adv = {}
    for name, plan in attacks.items():
        x_adv = _crafted(model, plan, cache / "adv", images, log)
        test_adv[name] = cached_features(model, x_adv, cfg, feats, f"test-{name}-{n_test}",
                                         log=log)
    return DetectionSets(
        fit_clean=cached_features(model, x_fit, cfg, feats, f"val-fit-clean-{n_fit}", log=log),
        fit_adv=cached_features(model, x_fit_adv, cfg, feats, f"val-fit-adv-{n_fit}", log=log),
        cal_clean=cached_features(model, x_cal, cfg, feats, f"val-cal-clean-{n_cal}", log=log),
        test_clean=cached_features(model, x_test, cfg, feats, f"test-clean-{n_test}", log=log),
        test_adv=test_adv, y_test=y_test.numpy(),
        described={"fit": [s.name for s in val_plan],
                   "fit_clean": f"val images 0..{n_fit - 1} (the attacked ones)",
                   "calibration_clean": f"val images {n_fit}..{n_fit + n_cal - 1}",
                   "test_clean": f"test images 0..{n_test - 1}",
                   "test_attacks": {k: [s.name for s in v] for k, v in attacks.items()}})


def group_detection(sets: DetectionSets, configs: dict[str, DynamicsConfig], *,
                    fpr: float = 0.05, reps: int = 1000, reference: str = REFERENCE
                    ) -> dict[str, dict[str, Any]]:
    """Per group: its fitted detector's features, threshold, and per test attack the AUROC and
    TPR (successful attacks vs correctly classified clean images) with bootstrap intervals, the
    TPR at its own validation-calibrated threshold (what serving flags) and the paired AUROC
    difference to the `reference` group."""
    clean_ok = sets.test_clean["_pred"] == sets.y_test
    scores: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        det = build_detector(sets.fit_clean, sets.fit_adv, sets.cal_clean, cfg,
                             names=cfg.names(), fpr=fpr)
        neg = score_features(det, sets.test_clean)
        pos = {a: score_features(det, f) for a, f in sets.test_adv.items()}
        scores[name] = (neg, pos)
        out[name] = {"features": det.features, "threshold": det.threshold,
                     "extra_f_evals": cfg.extra_f_evals(), "dynamics": cfg.model_dump(),
                     "clean_test_flagged": float(np.mean(neg > det.threshold)), "attacks": {}}
        for attack, p in pos.items():
            ok = clean_ok & (sets.test_adv[attack]["_pred"] != sets.y_test)
            entry = {"n_successful": int(ok.sum()),
                     "all": bootstrap(neg, p, fpr, reps=reps)}
            if ok.any():
                entry["successful"] = bootstrap(neg[clean_ok], p[ok], fpr, reps=reps)
                entry["successful_flagged"] = float(np.mean(p[ok] > det.threshold))
            out[name]["attacks"][attack] = entry
    if reference in scores:
        ref_neg, ref_pos = scores[reference]
        for name, (neg, pos) in scores.items():
            if name == reference:
                continue
            for attack, p in pos.items():
                entry = out[name]["attacks"][attack]
                entry[f"all_minus_{reference}"] = paired_difference(
                    neg, p, ref_neg, ref_pos[attack], reps=reps)
                ok = clean_ok & (sets.test_adv[attack]["_pred"] != sets.y_test)
                if ok.any():
                    entry[f"minus_{reference}"] = paired_difference(
                        neg[clean_ok], p[ok], ref_neg[clean_ok], ref_pos[attack][ok], reps=reps)
    return out


def _ci(entry: dict[str, Any], key: str) -> str:
    lo, hi = entry[f"{key}_ci"] or (float("nan"), float("nan"))
    return f"{entry[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def _diff(entry: dict[str, Any], key: str) -> str:
    d = entry.get(key)
    if d is None:
        return "-"
    lo, hi = d["ci"] or (float("nan"), float("nan"))
    return f"{d['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def markdown_table(detection: dict[str, dict[str, Any]], timing: dict[str, Any] | None,
                   reference: str = REFERENCE) -> str:
    """One row per group: per attack the AUROC on successful attacks and its paired difference
    to the reference group, the AUROC on every attacked input, the share of successful attacks
    flagged at the group's served threshold; then f evaluations and ms per answer."""
    attacks = list(next(iter(detection.values()))["attacks"])
    # batch sizes as timed, in order: "1", "pair" (a lone request as served), "32", ...
    sizes = list(next(iter(timing.values()))) if timing else []
    head = ["group", "features beyond the trajectory"]
    for a in attacks:
        head += [f"AUROC {a} succ. [95% CI]", f"vs {reference} [95% CI]", f"AUROC {a} all",
                 f"flagged {a}"]
    head += ["extra f evals"]
    for b in sizes:
        label = "pair" if b == "pair" else f"b{b}"
        head += [f"ms {label}", f"x plain {label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in detection.items():
        cells = [name, GROUPS[name][1] if name in GROUPS else ""]
        for a in attacks:
            e = row["attacks"][a]
            s = e.get("successful")
            cells += [_ci(s, "auroc") if s else "n/a", _diff(e, f"minus_{reference}"),
                      _ci(e["all"], "auroc"),
                      f"{e['successful_flagged']:.2f}" if s else "n/a"]
        cells.append(f"{row['extra_f_evals']:g}")
        for b in sizes:
            t = (timing or {}).get(name, {}).get(b)
            cells += [f"{t['ms_per_answer']:.2f}", f"{t['ratio']:.2f} ({t['ratio_min']:.2f}-"
                      f"{t['ratio_max']:.2f})"] if t else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

