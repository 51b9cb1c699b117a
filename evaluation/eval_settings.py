"""`deqguard eval`'s options turned into the run's `EvalSettings` (and its `SelectiveSettings`),
with a one-line error for each value the parser cannot check on its own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .choices import PARTS, SELECTIVE_SCORES
from .rectifier_cli import rectifier_settings
from .slowdown_cli import slowdown_settings


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def requested_parts(args: argparse.Namespace) -> list[str]:
    """The --attacks parts, checked before anything is loaded."""
    from deqguard.models.errors import DeqguardError

    if not args.checkpoint:
        raise DeqguardError("a CHECKPOINT is required (a .safetensors file or a shipped name "
                            "such as default)")
    parts = names(args.attacks)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise DeqguardError(f"unknown --attacks {unknown}; choose from {', '.join(PARTS)}")
    return parts


def _defense_config(pairs: list[str] | None, path: str | None = None):
    import yaml
    from pydantic import ValidationError

    from deqguard.models.defense import EntropyReductionConfig
    from deqguard.models.errors import DeqguardError

    fields = _defense_file(path) if path else {}
    for item in pairs or []:
        if "=" not in item:
            raise DeqguardError(f"--defense-set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        fields[key.strip()] = yaml.safe_load(value)
    try:
        return EntropyReductionConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DeqguardError(f"defense setting {'.'.join(map(str, err['loc']))}: "
                            f"{err['msg']}") from None


def _defense_settings(args: argparse.Namespace):
    path = getattr(args, "defense_config", None)
    if args.defense == "none":
        if path:
            from deqguard.models.errors import DeqguardError

            raise DeqguardError("--defense-config needs --defense entropy-reduction")
        return None
    return _defense_config(args.defense_set, path)


def _defense_file(path: str) -> dict:
    """The fields of --defense-config: a config, or a tuning report's `best_config`."""
    import json

    from deqguard.models.errors import DeqguardError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DeqguardError(f"--defense-config {path}: cannot read a JSON object: {exc}") from None
    if isinstance(data, dict) and "settings" in data and "best_config" in data:
        if data["best_config"] is None:
            raise DeqguardError(f"--defense-config {path}: the tuning chose no setting (none "
                                "kept clean accuracy on validation)")
        data = data["best_config"]
    if not isinstance(data, dict):
        raise DeqguardError(f"--defense-config {path}: expected a JSON object")
    return data


def _grid(text: str) -> list[tuple[int, int]]:
    from .attacks import parse_grid

    return parse_grid(text)


def selective_settings(args: argparse.Namespace, parts: list[str]):
    """SelectiveSettings when the selective part runs or --calibrate-selective asks for it."""
    from deqguard.models.errors import DeqguardError

    if "selective" not in parts and not args.calibrate_selective:
        return None
    from .schema import SelectiveSettings

    scores = names(args.selective_scores)
    unknown = sorted(set(scores + [args.selective_score]) - set(SELECTIVE_SCORES))
    if unknown:
        raise DeqguardError(f"unknown selective scores {unknown}; choose from "
                            f"{', '.join(SELECTIVE_SCORES)}")
    coverages = floats(args.coverages)
    if not coverages or not all(0 < c <= 1 for c in coverages):
        raise DeqguardError(f"--coverages must be numbers in (0, 1], got {args.coverages!r}")
    return SelectiveSettings(
        scores=scores, target_coverage=args.target_coverage, coverages=coverages,
        attack_n=args.selective_attack_n, pgd_steps=args.selective_pgd_steps,
        pgd_gradient=args.selective_gradient, adaptive_n=args.selective_adaptive_n,
        adaptive_lambda=args.selective_lambda, adaptive_steps=args.selective_adaptive_steps,
        reps=args.reps, calibrate=args.calibrate_selective, score=args.selective_score,
        cache=args.selective_cache)


def adaptive_selective_settings(args: argparse.Namespace, parts: list[str]):
    """AdaptiveSelectiveSettings when the adaptive-selective part runs."""
    from deqguard.models.errors import DeqguardError

    if "adaptive-selective" not in parts:
        return None
    from .adaptive_selective_schema import AdaptiveSelectiveSettings

    scores = names(args.adaptive_scores)
    unknown = sorted(set(scores) - set(SELECTIVE_SCORES))
    if not scores or unknown:
        raise DeqguardError(f"unknown --adaptive-scores {unknown}; choose from "
                            f"{', '.join(SELECTIVE_SCORES)}")
    coverages = floats(args.adaptive_coverages)
    if not coverages or not all(0 < c < 1 for c in coverages):
        raise DeqguardError(f"--adaptive-coverages must be numbers in (0, 1), got "
                            f"{args.adaptive_coverages!r}")
    for flag, value, low in (("--iters", args.iters, 1), ("--targets", args.targets, 0),
                             ("--adaptive-restarts", args.adaptive_restarts, 0)):
        if value < low:
            raise DeqguardError(f"{flag} must be at least {low}, got {value}")
    if args.adaptive_restarts == 0 and args.targets == 0:
        raise DeqguardError("--adaptive-restarts 0 and --targets 0 leave no attack to run")
    return AdaptiveSelectiveSettings(
        scores=scores, coverages=coverages, iters=args.iters, restarts=args.adaptive_restarts,
        targets=args.targets, loss=args.adaptive_loss, pgd_steps=args.selective_pgd_steps,
        pgd_gradient=args.selective_gradient, reps=args.reps, cache=args.selective_cache)


def eval_settings(args: argparse.Namespace, *, path: Path, data: str, data_dir: str | None,
                  n: int, eps: float, parts: list[str], selective: Any, device: str):
    """Every setting of the run, recorded in the report next to the numbers it produced."""
    from .schema import EvalSettings

    return EvalSettings(
        checkpoint=str(path), data=data, data_dir=data_dir, split=args.split,
        n=n, start=args.start, eps=eps, parts=parts, defense=args.defense,
        defense_config=_defense_settings(args),
        pgd_steps=args.pgd_steps, pgd_restarts=args.restarts, step_size=args.step_size,
        gradient_paths=names(args.paths) if args.paths else None,
        intermediate=_grid(args.intermediate), intermediate_tau=args.intermediate_tau,
        bpda_paths=names(args.bpda_paths) if args.bpda_paths else None,
        steps_sweep=ints(args.steps_sweep), eps_sweep=floats(args.eps_sweep),
        large_eps=args.large_eps, budgets=ints(args.budgets),
        aa_attacks=names(args.aa_attacks) if args.aa_attacks else None, aa_n=args.aa_n,
        aa_from=args.aa_from, aa_gradient=args.aa_gradient,
        sweep_n=args.sweep_n or None, sweep_gradient=args.sweep_gradient,
        detect_scores=names(args.scores), early_index=args.early_index,
        detector_lambda=args.detector_lambda, fpr=args.fpr, logistic=args.logistic,
        calibrate=args.calibrate, calibration_score=args.calibration_score,
        val_n=args.val_n, selective=selective, slowdown=slowdown_settings(args, parts),
        adaptive_selective=adaptive_selective_settings(args, parts),
        rectifier=rectifier_settings(args, parts),
        batch_size=args.batch_size, seed=args.seed, device=device)
