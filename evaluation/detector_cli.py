"""`deqguard detect fit|evaluate`: the learned detector on a checkpoint, from cached attacked sets.

    deqguard detect fit default --cache runs/detect --write          # metadata["detector"]
    deqguard detect fit default --features all-but-restart --write   # a cheaper feature set
    deqguard detect evaluate default --cache runs/detect --json runs/detect/eval.json \
        --plot runs/detect/detector.png --adaptive-n 20 --lambdas 0.5,2

Validation images: `advsets.VAL_PLAN` (attacked) and the clean images after them (threshold
calibration). Test images: `advsets.TEST_PLAN` (PGD-40 at eps 0.1). Both are crafted through
`--gradient` (default exact: backprop through the solver, the path robustness is judged by).
Everything expensive is cached under --cache/<the first 16 hex digits of the weights' sha256>,
so a killed run resumes, a rerun only redoes what changed, and another checkpoint gets its own
sets.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import Any

from deqguard.shipped import SHIPPED_NAMES
from deqguard.threads import add_threads_argument

from .choices import FEATURE_GROUPS
from .cli import HelpFormatter, add_gradient_argument

# numpy and torch are imported inside the handlers: `deqguard detect --help` loads neither.


def _load(args: argparse.Namespace):
    from deqguard.models import load_checkpoint
    from deqguard.threads import apply_threads

    apply_threads(args.threads)
    return load_checkpoint(args.checkpoint, "cpu")


def checkpoint_cache(root: str | Path, sha256: str) -> Path:
    """The cache folder of one set of weights: attacked sets and features belong to the model
    they were computed on, so a detector fitted for another checkpoint never reuses them."""
    return Path(root) / sha256[:16]


def _val_sets(model, cache: Path, cfg, n_cal: int, gradient: str):
    import numpy as np

    from .advsets import VAL_PLAN, craft_plan, split_images, with_gradient
    from .detector_fit import cached_features

    plan = with_gradient(VAL_PLAN, gradient)
    adv = craft_plan(model, plan, cache / "adv", log=lambda m: print(m, flush=True))
    end = max(s.start + s.count for s in plan)
    x_fit, _ = split_images("val", 0, end)
    x_cal, _ = split_images("val", end, n_cal)
    feats = cache / "features"
    fit_clean = cached_features(model, x_fit, cfg, feats, "val-fit-clean")
    fit_adv_parts = [cached_features(model, xa, cfg, feats, name) for name, xa in adv.items()]
    fit_adv = {k: np.concatenate([p[k] for p in fit_adv_parts]) for k in fit_clean}
    cal_clean = cached_features(model, x_cal, cfg, feats, "val-cal-clean")
    return fit_clean, fit_adv, cal_clean, [s.name for s in plan]


def _fit(args: argparse.Namespace) -> int:
    import numpy as np

    from deqguard.models import update_metadata
    from deqguard.provenance import invocation

    from .detector_fit import auroc_fast, build_detector, save_json, score_features
    from .detector_groups import group_config

    model, meta = _load(args)
    cfg = group_config(args.features)
    cache = checkpoint_cache(args.cache, meta.sha256)
    fit_clean, fit_adv, cal_clean, plan = _val_sets(model, cache, cfg, args.n_cal,
                                                    args.gradient)
    det = build_detector(fit_clean, fit_adv, cal_clean, cfg, fpr=args.fpr, l2=args.l2,
                         model_sha256=meta.sha256,
                         training={"data": "fashion-mnist val split (5000 held-out training "
                                   "images, seed 0)", "attacks": plan,
                                   "feature_group": args.features,
                                   "fit_clean": "val images 0..249 (the attacked ones)",
                                   "calibration_clean": f"val images 250..{249 + args.n_cal}",
                                   "fit": "L2 logistic regression, L-BFGS, balanced classes",
                                   # how to remake the block: the arguments main() parsed
                                   **invocation(["deqguard", *args.argv])})
    val_auroc = auroc_fast(score_features(det, fit_clean), score_features(det, fit_adv))
    det = det.model_copy(update={"metrics": {
        "validation_auroc_fit_data": val_auroc,
        "calibration_fpr": float(np.mean(score_features(det, cal_clean) > det.threshold))}})
    print(json.dumps({"features": det.features, "coef": [round(c, 3) for c in det.coef],
                      "threshold": det.threshold, **det.metrics}, indent=1))
    if args.write:
        update_metadata(args.checkpoint, detector=det.model_dump(mode="json"))
        print(f"wrote metadata['detector'] into {args.checkpoint}")
    if args.json:
        save_json(det.model_dump(mode="json"), args.json)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from deqguard.models.errors import DeqguardError
    from deqguard.models.learned_detector import detector_from_metadata

    from .advsets import TEST_PLAN, craft_plan, split_images, with_gradient
    from .detector_fit import cached_features, evaluate_scores, save_json

    model, meta = _load(args)
    det = detector_from_metadata(meta)
    if det is None:
        raise DeqguardError(f"{args.checkpoint} has no learned detector: run deqguard detect "
                            f"fit {args.checkpoint} --write")
    cache = checkpoint_cache(args.cache, meta.sha256)
    t0 = time.time()
    fit_clean, fit_adv, cal_clean, _ = _val_sets(model, cache, det.dynamics, args.n_cal,
                                                 args.gradient)
    plan = with_gradient(TEST_PLAN, args.gradient)
    spec = plan[0]
    x_test, y_test = split_images("test", spec.start, spec.count)
    x_adv = craft_plan(model, plan, cache / "adv",
                       log=lambda m: print(m, flush=True))[spec.name]
    feats = cache / "features"
    test_clean = cached_features(model, x_test, det.dynamics, feats, "test-clean")
    test_adv = cached_features(model, x_adv, det.dynamics, feats, spec.name)
    y = y_test.numpy()
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "sha256": meta.sha256,
                              "test_attack": spec.name, "detector": det.name,
                              "features": det.features}
    val_clean_all = {k: np.concatenate([fit_clean[k], cal_clean[k]]) for k in fit_clean}
    report["test"] = evaluate_scores(det, val_clean_all, fit_adv, test_clean, test_adv, y,
                                     fpr=args.fpr, reps=args.reps)
    if args.adaptive_n:
        report["adaptive"] = _adaptive(model, det, x_test, y_test, x_adv, args)
    if args.plot:
        _plot(report["test"], test_clean, test_adv, det, args.plot)
    report["seconds"] = time.time() - t0
    out = {k: v for k, v in report["test"].items() if k != "_curves"}
    print(json.dumps({"detector": out["scores"]["detector"],
                      "max_softmax": out["scores"].get("max_softmax"),
                      "difference": out.get("detector_minus_max_softmax"),
                      "at_threshold": out["detector_at_stored_threshold"],
                      "adaptive": report.get("adaptive")}, indent=1))
    if args.json:
        save_json(report, args.json)
    return 0


def _adaptive(model, det, x_test, y_test, x_adv_plain, args) -> dict[str, Any]:
    """Detector-aware PGD on the first --adaptive-n test images, next to plain PGD-40."""
    import numpy as np
    import torch

    from .detector_attack import detector_aware_pgd, summarise
    from .detector_fit import compute_features, score_features

    n = args.adaptive_n
    x, y = x_test[:n], y_test[:n]
    runs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    f = compute_features(model, x_adv_plain[:n], det.dynamics)
    runs["pgd40"] = (f["_pred"], score_features(det, f))
    for lam in args.lambdas:
        t = time.time()
        xa = torch.cat([detector_aware_pgd(model, det, x[i:i + 10], y[i:i + 10], eps=args.eps,
                                           lam=lam, steps=args.adaptive_steps, seed=i)
                        for i in range(0, n, 10)])
        f = compute_features(model, xa, det.dynamics)
        runs[f"adaptive_lam{lam:g}"] = (f["_pred"], score_features(det, f))
        print(f"adaptive lambda {lam}: {time.time() - t:.0f}s", flush=True)
    out = summarise(y.numpy(), det.threshold, runs)
    out["n"] = n
    out["eps"] = args.eps
    out["steps"] = args.adaptive_steps
    out["gradient"] = "exact (backprop through every solver iteration and the features)"
    return out


def _plot(test: dict[str, Any], clean: dict, adv: dict, det, path: str) -> None:
    import warnings

    with warnings.catch_warnings():  # matplotlib's warnings are not the user's; here only
        warnings.simplefilter("ignore")
        _draw(test, clean, adv, det, path)


def _draw(test: dict[str, Any], clean: dict, adv: dict, det, path: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .detector_fit import score_features

    names = ["detector", *det.features[:7]]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    ax = axes[0, 0]
    for name, (fpr, tpr) in test["_curves"].items():
        a = test["scores"][name]["all"]["auroc"]
        ax.plot(fpr, tpr, label=f"{name} (AUROC {a:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.axvline(test["fpr"], color="grey", lw=0.5)
    ax.set(xlabel="FPR (clean test)", ylabel="TPR (PGD-40 test)", title="ROC")
    ax.legend(fontsize=7)
    for ax, name in zip(axes.flat[1:], names, strict=False):
        if name == "detector":
            c, a = score_features(det, clean), score_features(det, adv)
        else:
            c, a = clean[name], adv[name]
        bins = np.histogram_bin_edges(np.concatenate([c, a]), bins=30)
        ax.hist(c, bins=bins, alpha=0.5, label="clean", density=True)
        ax.hist(a, bins=bins, alpha=0.5, label="PGD-40", density=True)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


_SUBCOMMANDS = {
    "fit": "craft (or reuse) the attacked validation sets, fit the logistic detector on their "
           "dynamics features, calibrate its threshold on clean validation images",
    "evaluate": "the checkpoint's stored detector on clean and PGD-40 test images, with "
                "bootstrap intervals, next to the max-softmax baseline",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="fit / evaluate the learned attack detector of a checkpoint",
                       description=__doc__, formatter_class=HelpFormatter)
    s = p.add_subparsers(dest="detect_command", required=True, metavar="{fit,evaluate}")
    for name, func in (("fit", _fit), ("evaluate", _evaluate)):
        q = s.add_parser(name, help=_SUBCOMMANDS[name],
                         description=textwrap.fill(_SUBCOMMANDS[name], 79),
                         formatter_class=HelpFormatter)
        q.add_argument("checkpoint", metavar="CHECKPOINT",
                       help=f"a .safetensors checkpoint or a shipped name ({SHIPPED_NAMES})")
        q.add_argument("--cache", default="runs/detect",
                       help="root of the attacked sets and features, one folder per weights")
        q.add_argument("--n-cal", type=int, default=300,
                       help="clean validation images for the threshold")
        q.add_argument("--fpr", type=float, default=0.05,
                       help="false-positive rate of the threshold on clean images")
        add_threads_argument(q, default=1)
        add_gradient_argument(q, "--gradient",
                              "gradient path the attacked sets are crafted through on a DEQ "
                              "(exact: backprop through every solver iteration)")
        q.add_argument("--json", metavar="FILE", help="also write the result as JSON here")
        q.set_defaults(func=func)
        if name == "fit":
            q.add_argument("--l2", type=float, default=1e-2,
                           help="L2 penalty of the logistic regression")
            q.add_argument("--write", action="store_true",
                           help="store the detector in the checkpoint's metadata['detector']")
            q.add_argument("--features", default="all", choices=FEATURE_GROUPS,
                           help="the feature group the detector reads (what serving computes "
                                "and pays for per request; bench/detect_cost.py compares them): "
                                "trajectory is free, all is every probe")
        else:
            q.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
            q.add_argument("--plot", metavar="PNG",
                           help="write the ROC and feature histograms here")
            q.add_argument("--adaptive-n", type=int, default=0,
                           help="detector-aware PGD on the first N test images (0: skip)")
            q.add_argument("--adaptive-steps", type=int, default=10,
                           help="steps of the detector-aware PGD")
            q.add_argument("--lambdas", type=_floats, default="0.5,2",
                           help="detector-aware PGD weights: CE - lambda * detector score, "
                                "one attack per value")
            q.add_argument("--eps", type=float, default=0.1,
                           help="L-inf radius of the detector-aware PGD")
