"""The rectifier-aware part's `deqguard eval` options and their settings (`RectifierEvalSettings`).

Light on purpose: the parser imports this module, so nothing here imports torch.
"""

from __future__ import annotations

import argparse

# rectifier_eval_schema.RECTIFIER_ATTACKS (that module imports pydantic models of the package)
ATTACKS = ("lam-pgd", "multi-targeted", "over-rejection")


def add_rectifier_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "attacks on the rectifier head (part rectifier-aware)",
        "On a checkpoint with a rectifier head, judged on the served rectified score at the "
        "thresholds answering --rectifier-coverages of clean validation images (the served "
        "calibration where it is of that score): PGD on CE + lam BCE(R, stopgrad p_y) per "
        "lambda, PGD on log p_t + log sigmoid(A) per top wrong class t, their per-image worst "
        "case against PGD (--selective-pgd-steps); and the share of clean inputs a "
        "doubt-raising nudge (answer kept) pushes into abstention, rectified against "
        "max_softmax. Exact gradient through the solver; cached under --selective-cache.")
    g.add_argument("--rectifier-attacks", default=",".join(ATTACKS),
                   help="comma list from " + ",".join(ATTACKS))
    g.add_argument("--rectifier-lambdas", default="0.5,1,2",
                   help="weights lam of the BCE term of lam-pgd")
    g.add_argument("--rectifier-targets", type=int, default=3, metavar="K",
                   help="multi-targeted: the K top wrong classes of the clean logits")
    g.add_argument("--rectifier-steps", type=int, default=40,
                   help="PGD steps of every rectifier-aware attack and of the nudge")
    g.add_argument("--rectifier-coverages", default="0.8,0.9",
                   help="clean coverages whose thresholds judge the attacks")
    g.add_argument("--nudge-eps", type=float, default=0.25,
                   help="over-rejection: the nudge's radius as a fraction of --eps")


def rectifier_settings(args: argparse.Namespace, parts: list[str]):
    """RectifierEvalSettings when the rectifier-aware part runs (else None); bad values as
    one line."""
    if "rectifier-aware" not in parts:
        return None
    from deqguard.models.errors import DeqguardError

    from .rectifier_eval_schema import RectifierEvalSettings

    def floats(text: str, flag: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise DeqguardError(f"{flag} must be a comma list of numbers, got "
                                f"{text!r}") from None

    attacks = [v.strip() for v in args.rectifier_attacks.split(",") if v.strip()]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown or not attacks:
        raise DeqguardError(f"unknown --rectifier-attacks {unknown or args.rectifier_attacks!r}"
                            f"; choose from {', '.join(ATTACKS)}")
    lambdas = floats(args.rectifier_lambdas, "--rectifier-lambdas")
    if "lam-pgd" in attacks and (not lambdas or min(lambdas) < 0):
        raise DeqguardError(f"--rectifier-lambdas must be numbers >= 0, got "
                            f"{args.rectifier_lambdas!r}")
    coverages = floats(args.rectifier_coverages, "--rectifier-coverages")
    if not coverages or not all(0 < c < 1 for c in coverages):
        raise DeqguardError(f"--rectifier-coverages must be numbers in (0, 1), got "
                            f"{args.rectifier_coverages!r}")
    for flag, value in (("--rectifier-targets", args.rectifier_targets),
                        ("--rectifier-steps", args.rectifier_steps)):
        if value < 1:
            raise DeqguardError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.nudge_eps <= 1:
        raise DeqguardError(f"--nudge-eps must be in (0, 1], got {args.nudge_eps}")
    return RectifierEvalSettings(
        attacks=attacks, lambdas=lambdas, targets=args.rectifier_targets,
        steps=args.rectifier_steps, coverages=coverages, over_rejection_eps=args.nudge_eps,
        pgd_steps=args.selective_pgd_steps, pgd_gradient=args.selective_gradient,
        reps=args.reps, cache=args.selective_cache)
