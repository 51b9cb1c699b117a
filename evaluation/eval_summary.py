"""The summary `deqguard eval` prints: the headline numbers of a report, rounded for people."""

from __future__ import annotations

from typing import Any


def for_people(value: Any) -> Any:
    """`value` with every float cut to 4 significant digits (0.14000000059604645 -> 0.14).

    For the printed summary only: the JSON report (--json, --report) keeps the exact numbers.
    Four digits resolve one image in 10,000 of an accuracy.
    """
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: for_people(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [for_people(v) for v in value]
    return value


def summary(report) -> dict:
    """Clean, per-attack, AutoAttack and worst-case accuracy, detection and selective answers."""
    from .report import detection_note

    out = {"checkpoint": report.checkpoint.path, "data": report.settings.data,
           "n": report.settings.n, "eps": report.settings.eps,
           "defense": report.settings.defense}
    if report.settings.start:
        out["images"] = report.settings.images
    if report.clean:
        out["clean_accuracy"] = report.clean.accuracy
    for a in report.attacks:
        out[f"acc/{a.name}"] = a.accuracy
    if report.autoattack:
        out["autoattack"] = report.autoattack.accuracy
    if report.worst_case:
        out["robust_accuracy_worst_case"] = report.worst_case.accuracy
    if report.detection:
        note = detection_note(report.detection)
        if note:
            out["detection_note"] = note
        if report.detection.calibration:
            out["detection"] = report.detection.calibration
    if report.selective:
        sel = report.selective
        out["selective"] = {
            k.kind: {name: {"aurc": r.aurc, "coverage": r.coverage,
                            "accuracy_answered": r.accuracy_answered,
                            "successful_answered": r.successful_answered}
                     for name, r in k.scores.items()} for k in sel.kinds}
        if sel.calibration:
            out["selective_calibration"] = {
                "score": sel.calibration["score"], "n": sel.calibration["n_calibration"],
                "written": sel.written_to_checkpoint}
    if report.slowdown:
        out["slowdown"] = slowdown_summary(report.slowdown)
    if report.adaptive_selective:
        out["adaptive_selective"] = {
            f"{r.score}@{r.coverage:g}": {
                "attack_error_rate": r.attack_error_rate, "pgd_error_rate": r.pgd_error_rate,
                "accuracy_answered": r.attacked_accuracy_answered,
                "successful_answered": r.successful_answered,
                "wrong_answered": r.wrong_answered}
            for r in report.adaptive_selective.rows}
    if report.rectifier:
        out["rectifier"] = {
            f"{r.score}/{r.attack}@{r.coverage:g}": {
                "attack_error_rate": r.attack_error_rate,
                "accuracy_answered": r.attacked_accuracy_answered,
                "successful_answered": r.successful_answered}
            for r in report.rectifier.rows}
        out["over_rejection"] = {f"{r.score}@{r.coverage:g}": r.pushed_out
                                 for r in report.rectifier.over_rejection}
    out["warnings"] = report.warnings
    out["seconds"] = round(report.seconds_total, 1)
    return out


def slowdown_summary(section) -> dict:
    """Per solver and budget: [clean, attacked] iterations, converged share and ms per answer."""
    out = {}
    for r in section.results:
        for b in r.budgets:
            c, a = b.clean, b.attacked
            out[f"{r.solver}/max_iter{b.max_iter}"] = {
                "mean_iterations": [c.mean_iterations, a.mean_iterations],
                "p90_iterations": [c.p90_iterations, a.p90_iterations],
                "max_iterations": [c.max_iterations, a.max_iterations],
                "converged": [c.converged_fraction, a.converged_fraction],
                "ms_per_answer": [c.ms_per_answer, a.ms_per_answer], "ms_ratio": b.ms_ratio}
    return out
