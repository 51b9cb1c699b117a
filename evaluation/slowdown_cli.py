"""The slowdown part's `deqguard eval` options and their settings (`SlowdownSettings`).

Light on purpose: the parser imports this module, so torch is only imported when a run checks
the solver names.
"""

from __future__ import annotations

import argparse


def add_slowdown_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "slowdown attacks (part slowdown)",
        "Inputs within --eps that raise the relative residual after k solver iterations "
        "(exact gradient through the solver, APGD step sizes); iterations, converged share and "
        "ms per answer, clean against attacked, at the checkpoint's max_iter and at "
        "--slowdown-cap.")
    g.add_argument("--slowdown-solvers", metavar="SOLVERS",
                   help="comma list of solvers to attack, each measured on itself, from "
                        "anderson,broyden,naive (default: the checkpoint's)")
    g.add_argument("--slowdown-k", type=int,
                   help="iterations whose residual the attack raises (default: half the "
                        "checkpoint's max_iter)")
    g.add_argument("--slowdown-steps", type=int, default=100, help="APGD steps per restart")
    g.add_argument("--slowdown-restarts", type=int, default=1, help="APGD random restarts")
    g.add_argument("--slowdown-n", type=int,
                   help="attack the first N test images (default: all --n)")
    g.add_argument("--slowdown-cap", type=int, default=100,
                   help="the second budget measured: the server's max_iter cap")
    g.add_argument("--slowdown-save", metavar="DIR",
                   help="write the attacked images here as slowdown-SOLVER.npz and 8-bit PNGs "
                        "(bench/slowdown_http.py sends them), and read them back instead of "
                        "attacking again when a rerun has the same settings (resume; default: "
                        "not written)")


def slowdown_settings(args: argparse.Namespace, parts: list[str]):
    """SlowdownSettings when the slowdown part runs (else None); bad values as one line."""
    if "slowdown" not in parts:
        return None
    from deqguard.models.errors import DeqguardError
    from deqguard.models.solvers import solver_names

    from .slowdown_schema import SlowdownSettings

    solvers = None
    if args.slowdown_solvers:
        solvers = [v.strip() for v in args.slowdown_solvers.split(",") if v.strip()]
        unknown = sorted(set(solvers) - set(solver_names()))
        if unknown or not solvers:
            raise DeqguardError(f"unknown --slowdown-solvers {unknown or args.slowdown_solvers!r}"
                                f"; choose from {', '.join(solver_names())}")
    for name in ("k", "steps", "restarts", "n", "cap"):
        value = getattr(args, f"slowdown_{name}")
        if value is not None and value < 1:
            raise DeqguardError(f"--slowdown-{name} must be at least 1, got {value}")
    return SlowdownSettings(solvers=solvers, k=args.slowdown_k, steps=args.slowdown_steps,
                            restarts=args.slowdown_restarts, n=args.slowdown_n,
                            cap=args.slowdown_cap, save=args.slowdown_save)
