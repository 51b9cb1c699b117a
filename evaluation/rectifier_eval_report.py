"""The rectifier-aware section of report.md, made from the report's JSON alone (it can be
rewritten from a saved report)."""

from __future__ import annotations

from .rectifier_eval_schema import OverRejectionRow, RectifierAttackRow, RectifierEvalSection


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _src(source: str) -> str:
    return "served" if source == "checkpoint" else "val"


def _row(r: RectifierAttackRow) -> str:
    weaker = " (weaker)" if r.weaker_than_pgd else ""
    return (f"| {r.score} | {r.attack} | {r.coverage:g} | {r.threshold:.4g} "
            f"({_src(r.threshold_source)}) | {_pct(r.clean_coverage)} / "
            f"{_pct(r.clean_accuracy_answered)} | "
            f"{_pct(r.attack_error_rate)}{weaker} | {_pct(r.attacked_coverage)} | "
            f"{_pct(r.attacked_accuracy_answered)}{_ci(r.attacked_accuracy_answered_ci)} | "
            f"{_pct(r.successful_answered)}{_ci(r.successful_answered_ci)} of "
            f"{r.n_successful} | {_pct(r.wrong_answered)}{_ci(r.wrong_answered_ci)} |")


def _nudge(r: OverRejectionRow) -> str:
    return (f"| {r.score} | {r.coverage:g} | {r.threshold:.4g} ({_src(r.threshold_source)}) | "
            f"{r.eps:g} | {_pct(r.clean_coverage)} | {_pct(r.nudged_coverage)} | "
            f"{_pct(r.answer_kept)} | {_pct(r.pushed_out)}{_ci(r.pushed_out_ci)} | "
            f"{_pct(r.pushed_out_of_answered)} | "
            f"{_pct(r.correct_pushed_out)}{_ci(r.correct_pushed_out_ci)} |")


def markdown(section: RectifierEvalSection) -> list[str]:
    """The report.md lines of the section."""
    a = section.attack
    head = ("the state only" if section.head_trajectory == 0 else
            f"the state and {section.head_trajectory} iterates of the solver path (the "
            "attacks' gradient flows through those path features too)")
    lines = [
        "## The rectifier head under attacks aimed at it", "",
        f"The head reads {head}. Attacks within eps {section.eps:g} on the first {section.n} "
        f"test images (clean accuracy {_pct(section.clean_accuracy)}), {a.get('steps')} PGD "
        "steps each, exact gradient through the solver: lam<l> maximises CE + l BCE(R, "
        "stopgrad p_y); target<j> maximises log p_t + log sigmoid(A) towards the j-th top "
        "wrong class; worst-case takes per image the worst of those sets (wrong and answered, "
        f"else wrong with the lowest doubt). {section.pgd.get('name', 'PGD')} is the baseline "
        "('weaker': fewer images misclassified than it). Judged on the served solve and "
        "score; intervals bootstrap 95% over the images.", "",
        "| score | attack | coverage | threshold | clean answered / accuracy | attack error | "
        "answered under attack | accuracy among answered | successful attacks answered | "
        "wrong answers given |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in section.rows]
    lines.append("")
    if section.over_rejection:
        lines += [
            "Over-rejection: a PGD nudge within the radius below that raises the score's doubt "
            "while the served answer stays the same. Pushed out: share of all images answered "
            "clean and abstained on after the nudge; correct pushed out: those whose clean "
            "answer was right.", "",
            "| score | coverage | threshold | radius | clean answered | answered after nudge | "
            "answer kept | pushed out | pushed out of answered | correct pushed out |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_nudge(r) for r in section.over_rejection]
        lines.append("")
    return lines
