"""Training curves: validation clean and PGD-10 accuracy against epoch, for several runs at once.

Reading one run's train_log.jsonl tells how far it got; comparing runs trained to different
lengths or learning rates needs them on one axis. This draws every run on one figure (a panel
for clean, one for PGD-10 accuracy on the validation split; a dot marks each run's best PGD
epoch, the checkpoint `best.safetensors` holds) and prints one Markdown row per run, straight
from its log. A run with a weight average (train.ema_decay) gets a dotted line for it in the
same colour, and the table a column for its best epoch:

    python bench/curves.py runs/long/fashion-cnn-wk runs/long/fashion-wk-regulated --out c.svg
    python bench/curves.py --root 'runs/long/lr-search/*' --root 'runs/long/e60/*' --out c.svg
    python bench/curves.py runs/long/trades-e100/regulated-trades3 \
        runs/long/e100/fashion-wk-regulated --blocks 10

`--blocks N` adds the runs' validation means over blocks of N epochs, side by side: two runs'
single epochs differ by more than their trends do. `--by-epoch` adds every epoch the runs all
reached, side by side (a run still training limits it), so an epoch-by-epoch comparison on a
page is a command's output rather than a hand-copied table.

A run still training is read as far as it got: no final line is needed, and a last line cut by
a write in progress is left out. A folder given by name without a log is refused; folders a
`--root` glob matches are skipped with a note until their first epoch is logged (so is a glob
that matches no run yet, as long as some run is left to draw). The label's preset and peak
learning rate come from the run's checkpoint metadata (last, else best); the log itself does
not record them.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

LOG = "train_log.jsonl"


class CurvesError(Exception):
    """Input the script cannot use; main() prints it as one line and exits 2."""


@dataclass
class Run:
    name: str
    folder: Path
    epochs: list[dict] = field(default_factory=list)  # one row per epoch, in epoch order
    finished: bool = False
    preset: str | None = None
    lr: float | None = None

    @property
    def label(self) -> str:
        preset = self.preset if self.preset != self.name else None
        extra = [x for x in (preset, f"lr {self.lr:g}" if self.lr is not None else None) if x]
        return f"{self.name} ({', '.join(extra)})" if extra else self.name


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The epoch rows (the last row kept per epoch) and whether the final line is there.

    Only the last line may be cut short (a write in progress); a broken line before it means the
    log is not what the trainer writes, so it is refused rather than silently thinned.
    """
    lines = path.read_text().splitlines()
    by_epoch: dict[int, dict] = {}
    finished = False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue
            raise CurvesError(f"{path}:{i}: not a JSON line (only the last line may be cut "
                              "short by a run in progress)") from None
        if not isinstance(row, dict):
            raise CurvesError(f"{path}:{i}: not a JSON object")
        if row.get("event") == "final":
            finished = True
        elif "event" not in row and "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)], finished


def run_metadata(folder: Path) -> tuple[str | None, float | None]:
    """Preset and peak learning rate from the newest checkpoint's metadata, when one exists."""
    for name in ("last.safetensors", "best.safetensors"):
        path = folder / name
        if not path.is_file():
            continue
        from deqguard.models import read_metadata  # torch: only when there is a checkpoint
        from deqguard.models.checkpoint import CheckpointError

        try:
            meta = read_metadata(path)
        except CheckpointError:
            continue
        lr = meta.trained_config("optim").get("lr")
        return meta.training.get("preset"), (float(lr) if lr is not None else None)
    return None, None


def load_run(folder: Path, *, metadata: bool = True) -> Run:
    log = folder / LOG
    if not folder.is_dir():
        raise CurvesError(f"{folder}: no such folder")
    if not log.is_file():
        raise CurvesError(f"{folder}: no {LOG} (not a run folder, or no epoch finished yet)")
    epochs, finished = read_log(log)
    if not epochs:
        raise CurvesError(f"{log}: no epoch logged yet")
    run = Run(folder.name, folder, epochs, finished)
    if metadata:
        run.preset, run.lr = run_metadata(folder)
    return run


def collect(folders: list[Path], roots: list[str], *, metadata: bool = True) -> list[Run]:
    """Named folders must be runs; glob matches that are not (yet) runs are skipped, noted."""
    runs = [load_run(f, metadata=metadata) for f in folders]
    for pattern in roots:
        matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
        found = 0
        for folder in matches:
            try:
                runs.append(load_run(folder, metadata=metadata))
                found += 1
            except CurvesError as exc:
                print(f"curves: skipped {exc}", file=sys.stderr)
        if not found:  # a grid not started yet must not stop the figure of the others
            print(f"curves: skipped --root {pattern!r}: it matches no run folder with a logged "
                  "epoch", file=sys.stderr)
    if not runs:
        raise CurvesError("no run with a logged epoch: name run folders or give --root GLOB"
                          + (f" (none under {', '.join(map(repr, roots))})" if roots else ""))
    return runs


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


EMA_PGD = "val_ema_pgd_accuracy"


def _best_cell(epochs: list[dict], key: str) -> str:
    scored = [e for e in epochs if e.get(key) is not None]
    if not scored:
        return "n/a"
    best = max(scored, key=lambda e: e[key])
    return f"{_pct(best[key])} ({best['epoch']})"


def table(runs: list[Run]) -> str:
    """One row per run, every number read from its log (s / epoch: median of train_seconds);
    a column for the weight average's best epoch when any run has one."""
    ema = any(e.get(EMA_PGD) is not None for r in runs for e in r.epochs)
    lines = ["| run | preset | peak lr | state | epochs | best val PGD-10 (epoch) | "
             + ("best val PGD-10, weight average (epoch) | " if ema else "")
             + "last val clean | last val PGD-10 | s / epoch | val mean iterations (last) |",
             "|---|---|---:|---|---:|---:|" + ("---:|" if ema else "") + "---:|---:|---:|---:|"]
    for r in runs:
        last = r.epochs[-1]
        secs = [e["train_seconds"] for e in r.epochs if e.get("train_seconds") is not None]
        secs_cell = f"{statistics.median(secs):.0f}" if secs else "n/a"
        iters = last.get("val_mean_iterations")
        lines.append(
            f"| {r.name} | {r.preset or 'n/a'} | {'n/a' if r.lr is None else f'{r.lr:g}'} | "
            f"{'finished' if r.finished else 'in progress'} | {last['epoch']} | "
            f"{_best_cell(r.epochs, 'val_pgd_accuracy')} | "
            + (f"{_best_cell(r.epochs, EMA_PGD)} | " if ema else "")
            + f"{_pct(last.get('val_clean_accuracy'))} | {_pct(last.get('val_pgd_accuracy'))} | "
            f"{secs_cell} | {'n/a' if iters is None else f'{iters:.1f}'} |")
    return "\n".join(lines)


BLOCK_KEYS = (("val_clean_accuracy", "clean", True), ("val_pgd_accuracy", "PGD-10", True),
              ("val_mean_iterations", "iterations", False))


def _block_mean(values: list[float], percent: bool) -> str:
    """The mean rounded half up to one decimal: float formatting rounds a tie such as 84.95 either
    way, and two pages quoting the same block must agree."""
    mean = sum(Decimal(repr(v)) for v in values) / len(values) * (100 if percent else 1)
    cell = str(mean.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    return cell + "%" if percent else cell


def block_table(runs: list[Run], size: int) -> str:
    """Validation means over blocks of `size` epochs (1 to size, size + 1 to 2 size, ...), the
    runs side by side: single epochs of two runs differ by more than a run's trend, blocks less.
    A run with fewer logged epochs in a block shows how many its cells average, and n/a where
    it has none."""
    header = ["epochs"] + [f"{r.name}: {label}" for r in runs for _, label, _ in BLOCK_KEYS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    last = max(r.epochs[-1]["epoch"] for r in runs)
    for lo in range(1, last + 1, size):
        hi = lo + size - 1
        cells = [f"{lo}-{hi}"]
        for r in runs:
            rows = [e for e in r.epochs if lo <= e["epoch"] <= hi]
            for key, _, percent in BLOCK_KEYS:
                values = [e[key] for e in rows if e.get(key) is not None]
                if not values:
                    cells.append("n/a")
                    continue
                n = len(values)
                note = "" if n == size else f" ({n} epoch{'s' if n > 1 else ''})"
                cells.append(_block_mean(values, percent) + note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _has_dynamics(run: Run) -> bool:
    """A feed-forward net logs one iteration an image; only a DEQ's count says anything."""
    return any((e.get("val_mean_iterations") or 1.0) != 1.0 for e in run.epochs)


def _pair(row: dict | None, first: str, second: str, *, percent: bool = True) -> str:
    """The cell "first / second%": the first in percent (accuracies) or as logged (iterations)."""
    if row is None or row.get(first) is None or row.get(second) is None:
        return "n/a"
    lead = 100 * row[first] if percent else row[first]
    return f"{lead:.1f} / {_pct(row[second])}"


def epoch_table(runs: list[Run]) -> str:
    """The runs' validation at every epoch they all reached, side by side: clean / PGD-10 for
    each, its weight average's where it keeps one, and a DEQ's mean solver iterations and
    converged fraction (whether it still behaves as an equilibrium model as it trains)."""
    # (header, the run's rows by epoch, first key, second key, first key in percent)
    columns: list[tuple[str, dict[int, dict], str, str, bool]] = []
    for r in runs:
        by_epoch = {e["epoch"]: e for e in r.epochs}
        columns.append((f"{r.name}: clean / PGD-10", by_epoch,
                        "val_clean_accuracy", "val_pgd_accuracy", True))
        if any(e.get(EMA_PGD) is not None for e in r.epochs):
            columns.append((f"{r.name}: weight average", by_epoch,
                            "val_ema_clean_accuracy", EMA_PGD, True))
        if _has_dynamics(r):
            columns.append((f"{r.name}: iterations / converged", by_epoch,
                            "val_mean_iterations", "val_converged_fraction", False))
    lines = ["| epoch | " + " | ".join(c[0] for c in columns) + " |",
             "|---:|" + "---|" * len(columns)]
    shared = min(r.epochs[-1]["epoch"] for r in runs)
    for epoch in range(1, shared + 1):
        cells = [str(epoch)] + [_pair(by_epoch.get(epoch), first, second, percent=percent)
                                for _, by_epoch, first, second, percent in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], out: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # text stays text in the SVG (small files) and no date is stamped (same input, same file)
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "deqguard-curves"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (("val_clean_accuracy", "validation clean accuracy"),
              ("val_pgd_accuracy", "validation PGD-10 accuracy"))
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for i, r in enumerate(runs):
        colour = palette[i % len(palette)]
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(e["epoch"], e[key]) for e in r.epochs if e.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "-" if r.finished else "--"
            ax.plot(xs, [100 * y for y in ys], style, marker=".", markersize=3,
                              linewidth=1.2, color=colour,
                              label=r.label + ("" if r.finished else ", in progress"))
            if key == "val_pgd_accuracy":
                bx, by = max(points, key=lambda p: p[1])
                ax.plot([bx], [100 * by], "o", color=colour, markersize=5)
            averaged = [(e["epoch"], e[f"val_ema_{key[4:]}"]) for e in r.epochs
                        if e.get(f"val_ema_{key[4:]}") is not None]
            if averaged:
                xs, ys = zip(*averaged, strict=True)
                ax.plot(xs, [100 * y for y in ys], ":", linewidth=1.2, color=colour,
                        label=f"{r.name}, weight average")
    for ax, (_, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{ylabel} (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight",
                metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                    help="a run folder (holding train_log.jsonl)")
    ap.add_argument("--root", action="append", default=[], metavar="GLOB",
                    help="a glob of run folders, e.g. 'runs/long/lr-search/*' (repeatable)")
    ap.add_argument("--out", type=Path, help="the figure: .svg or .png (default: no figure)")
    ap.add_argument("--title", help="a title above the two panels")
    ap.add_argument("--blocks", type=int, metavar="N",
                    help="also print validation means over blocks of N epochs, runs side by side")
    ap.add_argument("--by-epoch", action="store_true",
                    help="also print every epoch the runs all reached, runs side by side")
    args = ap.parse_args(argv)
    try:
        if args.out is not None and args.out.suffix not in (".svg", ".png"):
            raise CurvesError(f"--out {args.out}: the figure must be a .svg or .png file")
        if args.blocks is not None and args.blocks < 1:
            raise CurvesError(f"--blocks {args.blocks}: a block holds at least one epoch")
        runs = collect(args.runs, args.root)
    except CurvesError as exc:
        print(f"bench/curves.py: error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        plot(runs, args.out, args.title)
    print(table(runs))
    if args.blocks is not None:
        print()
        print(block_table(runs, args.blocks))
    if args.by_epoch:
        print()
        print(epoch_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
