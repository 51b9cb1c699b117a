"""Markdown summary and PNG plots of an `EvalReport`, made from the JSON alone.

Everything drawn here is in the report object, so a plot can be remade from a saved JSON:
`write_report(EvalReport.model_validate_json(text), out_dir)`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .schema import DetectionSection, EvalReport


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def detection_note(det: DetectionSection) -> str | None:
    """Why every AUROC of the detection table is n/a, in one line; None when some are not.

    An AUROC compares clean images with attacks that succeeded (a right answer turned wrong),
    so with no success there is nothing to detect, and a bare table of n/a reads as a bug.
    """
    if any(r.auroc is not None for a in det.attacks for r in a.scores.values()):
        return None
    if not det.attacks:
        return ("every AUROC is n/a: no attack ran, so there were no attacked inputs to detect "
                "(add pgd or adaptive to --attacks)")
    tried = sum(a.n_all for a in det.attacks)
    return (f"every AUROC is n/a: none of the {tried} attacked inputs turned a right answer "
            "wrong, so there is nothing to detect; a stronger attack (more --pgd-steps, a "
            "larger --eps) or more images (--n) would give some")


def _plots(report: EvalReport, out: Path) -> list[str]:
    """The PNGs, quietly: matplotlib's warnings (an empty legend, layout) are not the user's.

    The filter holds inside this call only; the rest of the process keeps its own.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _draw(report, out)


def _draw(report: EvalReport, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # robust accuracy per attack
    bars = []
    if report.clean:
        bars.append(("clean", report.clean.accuracy, report.clean.accuracy_undefended))
    for a in report.attacks:
        bars.append((a.name, a.accuracy, a.accuracy_undefended))
    if report.autoattack:
        bars.append(("AutoAttack", report.autoattack.accuracy, None))
    if report.worst_case:
        bars.append(("worst case", report.worst_case.accuracy, None))
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(bars) + 2), 4))
        xs = range(len(bars))
        ax.bar(xs, [b[1] for b in bars], color="tab:blue", label="evaluated predictor")
        if report.settings.defense != "none":
            ax.scatter(xs, [b[2] if b[2] is not None else float("nan") for b in bars],
                       color="tab:red", marker="_", s=300, label="same inputs, no defense")
            ax.legend(fontsize=8)
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"Robust accuracy, eps={report.settings.eps:.4g}, n={report.settings.n}")
        save(fig, "robust_accuracy.png")

    det = report.detection
    if det and det.trajectories:
        fig, ax = plt.subplots(figsize=(7, 4))
        for t in det.trajectories:
            if not t.entropy_mean:
                continue
            its = range(1, len(t.entropy_mean) + 1)
            line, = ax.plot(its, t.entropy_mean, label=f"{t.label} (n={t.n})")
            ax.fill_between(its, t.entropy_q25, t.entropy_q75, alpha=0.15,
                            color=line.get_color())
        ax.set_xlabel("solver iteration")
        ax.set_ylabel("prediction entropy (nats)")
        ax.set_title("Entropy along the dynamics: mean, band = 25-75% quantiles")
        ax.legend(fontsize=7)
        save(fig, "entropy_trajectory.png")

    if det and det.attacks:
        names = det.scores
        cols = min(3, len(names))
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
        for ax, score in zip(axes.flat, names, strict=False):
            for a in det.attacks:
                if score in a.roc:
                    c = a.roc[score]
                    auc = a.scores[score].auroc
                    ax.plot(c.fpr, c.tpr, label=f"{a.attack} ({_f(auc, 2)})")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
            ax.axvline(det.fpr, color="grey", lw=0.5)
            ax.set_title(score, fontsize=9)
            ax.set_xlabel("FPR (clean)")
            ax.set_ylabel("TPR (successful attacks)")
            if ax.get_legend_handles_labels()[0]:  # no curve when no attack succeeded
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        save(fig, "roc.png")

    if report.sweeps:
        sw = report.sweeps
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        a1.plot([p.value for p in sw.steps], [p.accuracy for p in sw.steps], "o-")
        a1.set_xlabel("PGD steps")
        a1.set_ylabel("robust accuracy")
        a1.set_ylim(0, 1)
        a2.plot([p.value for p in sw.eps], [p.accuracy for p in sw.eps], "o-")
        a2.set_xlabel("eps")
        a2.set_ylim(0, 1)
        fig.suptitle(f"Gradient-masking checks ({sw.attack})")
        save(fig, "sweeps.png")

    if report.budget:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ks = [p.max_iter for p in report.budget]
        ax.plot(ks, [p.accuracy for p in report.budget], "o-", label="clean accuracy")
        ax.plot(ks, [p.converged_fraction for p in report.budget], "s--",
                label="converged fraction")
        ax.set_xscale("log")
        ax.set_xlabel("solver budget max_iter")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("Accuracy and convergence against the budget")
        save(fig, "budget.png")

    if report.selective:
        from .selective_report import plots as selective_plots

        selective_plots(report.selective, save)
    return made


def render_markdown(report: EvalReport, plots: list[str], command: str | None = None) -> str:
    s = report.settings
    c = report.checkpoint
    lines = [f"# deqguard eval: {c.name or Path(c.path).name}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"- checkpoint `{c.path}` ({c.arch}, sha256 {c.sha256[:12]})",
              f"- data {s.data} {s.split}, n={s.n}"
              + (f" (images {s.images})" if s.start else "")
              + f"; Linf eps={s.eps:.4g}; defense: {s.defense}",
              f"- deqguard {report.deqguard_version}, {report.created}, device {s.device}, "
              f"{report.seconds_total:.0f} s", ""]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in report.warnings] + [""]
    if report.defense:
        d = report.defense
        lines += ["## Defense (entropy reduction, paper Sec 3.2)", "",
                  f"**Robust accuracy under adaptive attacks: {_pct(d.robust_accuracy)}** "
                  "(per-sample worst case over transfer, BPDA and AutoAttack). This is the "
                  "honest number; the transfer-only figure is the paper's protocol and "
                  "overstates robustness when it is higher.", "",
                  "| protocol | robust accuracy |", "|---|---|",
                  f"| transfer PGD from the undefended model (paper) | "
                  f"{_pct(d.transfer_accuracy)} |",
                  f"| adaptive PGD, BPDA through the input updates | "
                  f"{_pct(d.adaptive_accuracy)} |",
                  f"| AutoAttack on the defended forward (BPDA gradient) | "
                  f"{_pct(d.autoattack_accuracy)} |",
                  f"| worst case of all | {_pct(d.robust_accuracy)} |", "",
                  f"Compute overhead: defended inference takes {d.overhead_ratio:.1f}x the "
                  "time of the plain solve.", ""]
    if report.clean:
        k = report.clean
        lines += ["## Clean", "", f"accuracy {_pct(k.accuracy)} (undefended "
                  f"{_pct(k.accuracy_undefended)}), converged {_pct(k.converged_fraction)}, "
                  f"mean iterations {k.mean_iterations:.1f}, "
                  f"{1000 * k.seconds_per_sample:.2f} ms/sample", ""]
    if report.budget:
        lines += ["## Accuracy and convergence against the solver budget", "",
                  "| max_iter | accuracy | converged | mean iterations |", "|---|---|---|---|"]
        for p in report.budget:
            tag = " (default)" if p.is_default else ""
            lines.append(f"| {p.max_iter}{tag} | {_pct(p.accuracy)} | "
                         f"{_pct(p.converged_fraction)} | {p.mean_iterations:.1f} |")
        lines.append("")
    if report.attacks or report.autoattack:
        lines += ["## Robust accuracy per attack", "",
                  "| attack | threat | accuracy | undefended | settings | seconds |",
                  "|---|---|---|---|---|---|"]
        for a in report.attacks:
            spec = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in a.spec.items() if k not in ("name", "eps"))
            lines.append(f"| {a.name} | {a.threat} | {_pct(a.accuracy)} | "
                         f"{_pct(a.accuracy_undefended)} | {spec} | {a.seconds:.0f} |")
        if report.autoattack:
            aa = report.autoattack
            after = ", ".join(f"{k} {_pct(v)}" for k, v in aa.accuracy_after.items())
            forward = f"{aa.forward}, {aa.gradient} gradient" if aa.gradient else aa.forward
            taken = (f"; {', '.join(aa.earlier.stages)} taken from {aa.earlier.report}"
                     if aa.earlier else "")
            lines.append(f"| AutoAttack {aa.version} | {forward} | {_pct(aa.accuracy)} | | "
                         f"n={aa.n}; after: {after}{taken} | {sum(aa.seconds.values()):.0f} |")
        if report.worst_case:
            w = report.worst_case
            lines.append(f"| **worst case per sample** | | **{_pct(w.accuracy)}** | | "
                         f"n={w.n}, over {len(w.attacks)} attacks | |")
        lines.append("")
    if report.sweeps:
        sw = report.sweeps
        lines += ["## Gradient-masking checks", "",
                  f"Attack: {sw.attack}. Accuracy by PGD steps: "
                  + ", ".join(f"{int(p.value)}: {_pct(p.accuracy)}" for p in sw.steps)
                  + f" (monotone: {sw.monotone_steps}). By eps: "
                  + ", ".join(f"{p.value:.3g}: {_pct(p.accuracy)}" for p in sw.eps)
                  + f" (monotone: {sw.monotone_eps}).", ""]
    det = report.detection
    if det:
        lines += ["## Detection from the trajectory", "",
                  f"AUROC (clean test vs successful adversarial inputs) / TPR at "
                  f"{_pct(det.fpr)} FPR. Scores: higher = more suspicious.", ""]
        lines += ["| attack (successful/all) | " + " | ".join(det.scores) + " |",
                  "|---|" + "---|" * len(det.scores)]
        for a in det.attacks:
            cells = [f"{_f(a.scores[n].auroc, 2)} / {_pct(a.scores[n].tpr_at_fpr)}"
                     for n in det.scores]
            lines.append(f"| {a.attack} ({a.n_successful}/{a.n_all}) | " + " | ".join(cells)
                         + " |")
        note = detection_note(det)
        if note:
            lines += ["", note[0].upper() + note[1:] + "."]
        lines.append("")
        if det.calibration:
            cal = det.calibration
            lines += [f"Calibration on {cal.get('n_calibration')} clean validation images: "
                      f"score `{cal['score']}`, threshold {cal['threshold']:.4g} at FPR "
                      f"{_pct(cal['fpr'])}; clean test FPR at that threshold "
                      f"{_pct(det.clean_test_fpr_at_val_threshold)}; "
                      + (f"TPR vs {cal['attack']} {_pct(cal.get('tpr'))}" if cal.get("attack")
                         else "TPR not measured (its attack, PGD, was not run)")
                      + ". Written to the checkpoint: "
                      f"{det.written_to_checkpoint}.", ""]
    if report.selective:
        from .selective_report import markdown as selective_markdown

        lines += selective_markdown(report.selective)
    if report.slowdown:
        from .slowdown_part import markdown as slowdown_markdown

        lines += slowdown_markdown(report.slowdown)
    if report.adaptive_selective:
        from .adaptive_selective_report import markdown as adaptive_selective_markdown

        lines += adaptive_selective_markdown(report.adaptive_selective)
    if report.rectifier:
        from .rectifier_eval_report import markdown as rectifier_markdown

        lines += rectifier_markdown(report.rectifier)
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def write_report(report: EvalReport, out_dir: str | Path, command: str | None = None) -> Path:
    """Write report.md, report.json and the plots into out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    (out / "report.json").write_text(report.model_dump_json(indent=2))
    md = out / "report.md"
    md.write_text(render_markdown(report, plots, command))
    return md
