"""The adaptive-selective section of report.md: "What the doubt scores are worth under attack".

Made from the report's JSON alone, like selective_report.py, so it can be rewritten from a saved
report.
"""

from __future__ import annotations

from .adaptive_selective_schema import AdaptiveSelectiveRow, AdaptiveSelectiveSection


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _area(v: float, ci: list[float] | None) -> str:
    return f"{v:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def _row(r: AdaptiveSelectiveRow) -> str:
    weaker = " (weaker)" if r.weaker_than_pgd else ""
    src = "served" if r.threshold_source == "checkpoint" else "val"
    return (f"| {r.score} | {r.coverage:g} | {r.threshold:.4g} ({src}) | "
            f"{_pct(r.clean_coverage)} / {_pct(r.clean_accuracy_answered)}"
            f"{_ci(r.clean_accuracy_answered_ci)} | "
            f"{_pct(r.attack_error_rate)}{weaker} ({_pct(r.pgd_error_rate)}) | "
            f"{_pct(r.attacked_coverage)}{_ci(r.attacked_coverage_ci)} | "
            f"{_pct(r.attacked_accuracy_answered)}{_ci(r.attacked_accuracy_answered_ci)} | "
            f"{_pct(r.successful_answered)}{_ci(r.successful_answered_ci)} of "
            f"{r.n_successful} | {_pct(r.wrong_answered)}{_ci(r.wrong_answered_ci)} | "
            f"{_area(r.aurc_clean, r.aurc_clean_ci)} / "
            f"{_area(r.aurc_attacked, r.aurc_attacked_ci)} | "
            f"{_area(r.augrc_clean, r.augrc_clean_ci)} / "
            f"{_area(r.augrc_attacked, r.augrc_attacked_ci)} |")


def markdown(section: AdaptiveSelectiveSection) -> list[str]:
    """The report.md lines of the section."""
    pgd = section.pgd
    lines = [
        "## What the doubt scores are worth under attack", "",
        f"Per doubt score and clean coverage, an attack aimed at a wrong answer that the score "
        f"lets through (APGD schedule, exact gradient through the solver; {_spec(section)}), "
        f"on the first {section.n} test images at eps {section.eps:g} (clean accuracy "
        f"{_pct(section.clean_accuracy)}). Judged on the served solve and score. Attack error: "
        f"share misclassified, with {pgd.get('name', 'PGD')} on the same images in brackets; "
        "'weaker' marks an attack that misclassifies fewer. Successful attacks: a correct "
        "clean answer made wrong. Wrong answers given: share of all images answered wrongly. "
        "AURC / AUGRC (Traub et al. 2024): clean / attacked, lower is better. Intervals: "
        f"bootstrap 95% over the images ({section.bootstrap_reps} resamples), thresholds "
        "fixed.", "",
        "| score | coverage | threshold | clean answered / accuracy among answered | attack "
        "error (PGD) | answered under attack | accuracy among answered under attack | "
        "successful attacks answered | wrong answers given | AURC | AUGRC |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in section.rows]
    lines.append("")
    if section.best:
        lines.append("Holds best under its own attack (accuracy among the answered): " + ", ".join(
            f"coverage {c}: {name}" for c, name in section.best.items()) + ".")
    lines += _target_lines(section)
    weaker = [r for r in section.rows if r.weaker_than_pgd]
    if weaker:
        lines.append("Weaker than PGD on these images: " + ", ".join(
            f"{r.score} at {r.coverage:g}" for r in weaker) + " (the aimed attack spends its "
            "steps on lowering the score; the per-image best keeps any wrong answer, so fewer "
            "errors mean its runs found fewer).")
    if section.skipped:
        lines.append("Not attacked: " + "; ".join(section.skipped) + ".")
    lines.append("")
    return lines


def _spec(section: AdaptiveSelectiveSection) -> str:
    a = section.rows[0].attack if section.rows else {}
    return (f"{a.get('iters')} iterations, {a.get('restarts')} untargeted {a.get('loss')} "
            f"run(s) + {a.get('targets')} targeted DLR") if a else "no rows"


def _target_lines(section: AdaptiveSelectiveSection) -> list[str]:
    """The served score against the aim: under its own attack at coverage 0.9, accuracy among
    the answered no lower than clean, at most a third of successful attacks answered."""
    row = next((r for r in section.rows
                if r.score == section.served_score and abs(r.coverage - 0.9) < 1e-9), None)
    if row is None or row.attacked_accuracy_answered is None:
        return []
    gap = (row.clean_accuracy_answered or 0.0) - row.attacked_accuracy_answered
    share = row.successful_answered
    return [f"Served score {row.score} at coverage 0.9: accuracy among the answered "
            f"{_pct(row.attacked_accuracy_answered)} under attack against "
            f"{_pct(row.clean_accuracy_answered)} clean "
            + ("(meets the aim)" if gap <= 0 else f"({100 * gap:.1f} points short)")
            + f"; successful attacks answered {_pct(share)} (aim at most 33.3%"
            + ("" if share is None or share <= 1 / 3 else
               f", {100 * (share - 1 / 3):.1f} points over") + ")."]
