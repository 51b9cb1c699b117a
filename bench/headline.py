"""README's headline table: each model's three `deqguard eval` reports side by side.

Every headline model is evaluated by the same three lines (see README, Results), whose JSON
reports sit in one folder per model:

    deqguard eval CKPT --data fashion-mnist --threads 1 --n 10000 --attacks clean,budget \
        --batch-size 1000 --json DIR/clean-budget-n10000.json
    deqguard eval CKPT --data fashion-mnist --threads 1 --n 1000 --attacks clean,pgd,adaptive \
        --sweep-n 200 --batch-size 500 --json DIR/whitebox-n1000.json
    deqguard eval CKPT --data fashion-mnist --threads 1 --n 1000 --attacks clean,aa \
        --aa-attacks apgd-ce,apgd-t --batch-size 500 --json DIR/aa-n1000.json

This prints one markdown row per `NAME=DIR[=RUN]` (RUN: the training folder whose
train_log.jsonl gives epochs and seconds per epoch), with binomial standard errors, so the
table in the README is the output of a command rather than numbers copied by hand:

    python bench/headline.py "anchor CNN=docs/eval/wk/fashion-cnn-wk=runs/long/fashion-cnn-wk" ...

A missing report leaves its cells as "not run"; nothing is filled in from elsewhere. Where only
APGD-CE ran (`--aa-attacks apgd-ce --json DIR/aa-apgd-ce-n1000.json`), its number is shown as
the upper bound it is.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

NOT_RUN = "not run"


def pct(p: float | None, n: int | None = None) -> str:
    if p is None:
        return NOT_RUN
    if n is None:
        return f"{100 * p:.1f}%"
    se = math.sqrt(p * (1 - p) / n)
    return f"{100 * p:.1f} ± {100 * se:.1f}%"


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def training(run: Path | None) -> tuple[str, str]:
    """Epochs trained and the median seconds per epoch (one thread, often beside other runs)."""
    log = run / "train_log.jsonl" if run else None
    if log is None or not log.is_file():
        return NOT_RUN, NOT_RUN
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if "epoch" in r and "train_seconds" in r]
    if not epochs:
        return NOT_RUN, NOT_RUN
    seconds = statistics.median(r["train_seconds"] for r in epochs)
    return str(epochs[-1]["epoch"]), f"{seconds:.0f}"


def budget_cell(report: dict | None) -> tuple[str, str]:
    if report is None:
        return NOT_RUN, NOT_RUN
    if not report.get("budget"):   # a feedforward net has no iteration budget
        return "n/a", "n/a"
    by_iter = {b["max_iter"]: b for b in report["budget"]}
    accs = " / ".join(pct(by_iter[k]["accuracy"]) if k in by_iter else NOT_RUN
                      for k in (10, 30, 60))
    return accs, pct(report["clean"]["converged_fraction"])


def row(spec: str) -> str:
    parts = spec.split("=")
    name, folder = parts[0], Path(parts[1])
    run = Path(parts[2]) if len(parts) > 2 else None
    full = load(folder, "clean-budget-n10000")
    white = load(folder, "whitebox-n1000")
    aa = load(folder, "aa-n1000")
    epochs, seconds = training(run)
    clean_full = pct(full["clean"]["accuracy"], full["clean"]["n"]) if full else NOT_RUN
    clean_1k = pct(white["clean"]["accuracy"], white["clean"]["n"]) if white else NOT_RUN
    worst = (pct(white["worst_case"]["accuracy"], white["worst_case"]["n"])
             if white and white.get("worst_case") else NOT_RUN)
    auto = (pct(aa["autoattack"]["accuracy"], aa["autoattack"]["n"])
            if aa and aa.get("autoattack") else NOT_RUN)
    ce_only = load(folder, "aa-apgd-ce-n1000")
    if auto == NOT_RUN and ce_only and ce_only.get("autoattack"):
        # APGD-CE alone can only overstate what APGD-CE + APGD-T would leave
        a = ce_only["autoattack"]
        auto = f"<= {pct(a['accuracy'], a['n'])} (APGD-CE only)"
    budgets, converged = budget_cell(full)
    return (f"| {name} | {epochs} | {seconds} | {clean_full} | {clean_1k} | {worst} | {auto} | "
            f"{budgets} | {converged} |")


HEADER = ("| model | epochs | s / epoch | clean, 10,000 test | clean, first 1,000 | "
          "worst white-box, first 1,000 | APGD-CE + APGD-T, first 1,000 | "
          "clean at budget 10 / 30 / 60 | converged within 30 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME=DIR[=RUN]")
    args = parser.parse_args()
    print(HEADER)
    for spec in args.models:
        print(row(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
