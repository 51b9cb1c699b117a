"""The selective section of an eval report: one risk-coverage plot per kind of input, and a table.

Made from the report's JSON alone (like report.py, which calls these two functions), so the
plots can be redrawn from a saved report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .schema import SelectiveSection


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def plots(section: SelectiveSection, save: Callable[[Any, str], None]) -> None:
    """selective-<kind>.png: accuracy among the answered against coverage, one line per score,
    each with a dot where the clean-validation threshold of the target coverage puts it (on
    attacked inputs that is not at the target coverage: the dot shows how much the threshold
    still answers); `save(fig, name)` writes and records the file."""
    import matplotlib.pyplot as plt

    for kind in section.kinds:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, r in kind.scores.items():
            line, = ax.plot(r.curve.coverage, r.curve.accuracy,
                            label=f"{name} (AURC {r.aurc:.3f})")
            if r.coverage is not None and r.accuracy_answered is not None:
                ax.plot([r.coverage], [r.accuracy_answered], "o", color=line.get_color())
        ax.axhline(kind.accuracy, color="grey", lw=0.6, ls=":", label="answer everything")
        ax.plot([], [], "o", color="grey",
                label=f"at the clean-validation threshold of coverage {section.target_coverage:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("coverage (share answered, least doubtful first)")
        ax.set_ylabel("accuracy among the answered")
        ax.set_title(f"Risk-coverage: {kind.kind} (n={kind.n})")
        ax.legend(fontsize=7)
        save(fig, f"selective-{kind.kind}.png")


def markdown(section: SelectiveSection) -> list[str]:
    """The report.md lines of the section."""
    t = section.target_coverage
    lines = ["## Selective answers (risk-coverage)", "",
             f"Doubt scores (higher = less sure; answered when score <= threshold). Thresholds "
             f"answer {_pct(t)} of {section.n_val} clean validation images (validation accuracy "
             f"{_pct(section.val_accuracy)}); every kind of test input is judged at them. "
             f"Intervals: bootstrap 95% over the test inputs ({section.bootstrap_reps} "
             "resamples), thresholds fixed.", ""]
    for kind in section.kinds:
        attacked = kind.n_successful is not None
        head = f"### {kind.kind} (n={kind.n}, accuracy answering everything {_pct(kind.accuracy)}"
        head += f", successful attacks {kind.n_successful})" if attacked else ")"
        lines += [head, "", "| score | AURC | answered | accuracy among answered |"
                  + (" successful attacks answered |" if attacked else ""),
                  "|---|---|---|---|" + ("---|" if attacked else "")]
        for name, r in kind.scores.items():
            mark = " (best)" if name == kind.best else ""
            row = (f"| {name}{mark} | {r.aurc:.3f}"
                   + (f" [{r.aurc_ci[0]:.3f}, {r.aurc_ci[1]:.3f}]" if r.aurc_ci else "")
                   + f" | {_pct(r.coverage)}{_ci(r.coverage_ci)} | "
                   f"{_pct(r.accuracy_answered)}{_ci(r.accuracy_answered_ci)} |")
            if attacked:
                row += f" {_pct(r.successful_answered)}{_ci(r.successful_answered_ci)} |"
            lines.append(row)
        lines.append("")
    if section.skipped:
        lines += ["Not measured: " + "; ".join(section.skipped) + ".", ""]
    cal = section.calibration
    if cal:
        lines += [f"Calibration: score `{cal['score']}` on {cal['n_calibration']} clean validation "
                  f"images, coverages {cal['coverages'][0]:g} to 1; written to the checkpoint: "
                  f"{section.written_to_checkpoint}.", ""]
    return lines
