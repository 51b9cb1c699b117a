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

An optional fourth line adds Square (gradient-free, 5,000 queries) after APGD-CE and APGD-T, the
check that the gradient attacks did not leave adversarial points unfound (on every model
measured they did, 0.5 to 2.4 points: docs/results.md). It takes the third line's per-image
APGD outcomes as they are (`--aa-from`) and runs Square alone on the images they left, which is
what one run of all three stages does (reports before `--aa-from` reran the two APGD stages
first, about half of such a line's time); `--square` asks for it:

    deqguard eval CKPT --data fashion-mnist --threads 1 --n 1000 --attacks clean,aa \
        --aa-attacks apgd-ce,apgd-t,square --aa-from DIR/aa-n1000.json --batch-size 500 \
        --json DIR/aa-square-n1000.json

`--evaluate` first runs the three lines for every model whose reports are missing, so a new
checkpoint gets its row from one command (RUN: a run folder, whose best.safetensors is
evaluated, or a checkpoint file inside one). Each line's output goes to DIR/<report>.log under
the command; a report already there is kept, so an interrupted evaluation resumes at the line
it stopped in:

  python bench/headline.py --evaluate "anchor-e60=docs/eval/wk/anchor-e60=runs/long/e60/anchor-e60"
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
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


class HeadlineError(Exception):
    """A model spec or evaluation the script cannot use; main() prints it as one line, exit 2."""


def report_names(n_clean: int = 10000, n_attack: int = 1000) -> dict[str, str]:
    """The reports' file stems (without .json) for these image counts."""
    return {"full": f"clean-budget-n{n_clean}", "white": f"whitebox-n{n_attack}",
            "aa": f"aa-n{n_attack}", "ce_only": f"aa-apgd-ce-n{n_attack}",
            "square": f"aa-square-n{n_attack}"}


def eval_lines(checkpoint: Path, folder: Path, n_clean: int = 10000, n_attack: int = 1000,
               extra: list[str] | None = None, square: bool = False
               ) -> list[tuple[str, list[str]]]:
    """The three `deqguard eval` lines of a headline row (four with `square`), as (report
    stem, argv)."""
    names = report_names(n_clean, n_attack)
    common = ["--data", "fashion-mnist", "--threads", "1", "--no-progress"]
    parts = [
        (names["full"], ["--n", str(n_clean), "--attacks", "clean,budget",
                         "--batch-size", "1000"]),
        (names["white"], ["--n", str(n_attack), "--attacks", "clean,pgd,adaptive",
                          "--sweep-n", str(min(200, n_attack)), "--batch-size", "500"]),
        (names["aa"], ["--n", str(n_attack), "--attacks", "clean,aa",
                       "--aa-attacks", "apgd-ce,apgd-t", "--batch-size", "500"]),
    ]
    if square:
        parts.append((names["square"], ["--n", str(n_attack), "--attacks", "clean,aa",
                                        "--aa-attacks", "apgd-ce,apgd-t,square",
                                        "--aa-from", str(folder / f"{names['aa']}.json"),
                                        "--batch-size", "500"]))
    return [(stem, ["deqguard", "eval", str(checkpoint), *common, *args,
                    "--json", str(folder / f"{stem}.json"), "--report", str(folder / stem),
                    *(extra or [])])
            for stem, args in parts]


def parse_spec(spec: str) -> tuple[str, Path, Path | None, Path | None]:
    """NAME=DIR[=RUN] -> name, report folder, run folder, checkpoint (RUN's best, or RUN)."""
    parts = spec.split("=")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise HeadlineError(f"{spec!r}: expected NAME=DIR or NAME=DIR=RUN")
    if len(parts) == 2:
        return parts[0], Path(parts[1]), None, None
    target = Path(parts[2])
    if target.suffix == ".safetensors":
        return parts[0], Path(parts[1]), target.parent, target
    return parts[0], Path(parts[1]), target, target / "best.safetensors"


def evaluate(spec: str, n_clean: int, n_attack: int, extra: list[str],
             square: bool = False) -> None:
    """Run the lines whose report is missing, each teed to DIR/<report>.log."""
    name, folder, _, checkpoint = parse_spec(spec)
    if checkpoint is None:
        raise HeadlineError(f"{spec!r}: --evaluate needs NAME=DIR=RUN (the run to evaluate)")
    if not checkpoint.is_file():
        raise HeadlineError(f"{spec!r}: no checkpoint {checkpoint}")
    folder.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("deqguard")
    # where the console script is not beside the interpreter (an install into another prefix)
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "deqguard.cli"]
    for stem, argv in eval_lines(checkpoint, folder, n_clean, n_attack, extra, square):
        if (folder / f"{stem}.json").is_file():
            print(f"[headline] {name}: {stem}.json is there, kept", file=sys.stderr, flush=True)
            continue
        print(f"[headline] {name}: {shlex.join(argv)}", file=sys.stderr, flush=True)
        start = time.monotonic()
        with (folder / f"{stem}.log").open("w") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.run([*launcher, *argv[1:]], stdout=log,
                                  stderr=subprocess.STDOUT)
            wall = time.monotonic() - start
            log.write(f"# exit {proc.returncode}, wall {wall:.0f} s\n")
        print(f"[headline] {name}: {stem} exit {proc.returncode}, wall {wall:.0f} s",
              file=sys.stderr, flush=True)
        if proc.returncode != 0:
            raise HeadlineError(f"{name}: deqguard eval exited {proc.returncode} "
                                f"(its output: {folder / f'{stem}.log'})")


def row(spec: str, n_clean: int = 10000, n_attack: int = 1000) -> str:
    name, folder, run, _ = parse_spec(spec)
    names = report_names(n_clean, n_attack)
    full = load(folder, names["full"])
    white = load(folder, names["white"])
    aa = load(folder, names["aa"])
    epochs, seconds = training(run)
    clean_full = pct(full["clean"]["accuracy"], full["clean"]["n"]) if full else NOT_RUN
    clean_1k = pct(white["clean"]["accuracy"], white["clean"]["n"]) if white else NOT_RUN
    worst = (pct(white["worst_case"]["accuracy"], white["worst_case"]["n"])
             if white and white.get("worst_case") else NOT_RUN)
    auto = (pct(aa["autoattack"]["accuracy"], aa["autoattack"]["n"])
            if aa and aa.get("autoattack") else NOT_RUN)
    ce_only = load(folder, names["ce_only"])
    if auto == NOT_RUN and ce_only and ce_only.get("autoattack"):
        # APGD-CE alone can only overstate what APGD-CE + APGD-T would leave
        a = ce_only["autoattack"]
        auto = f"<= {pct(a['accuracy'], a['n'])} (APGD-CE only)"
    sq = load(folder, names["square"])
    with_square = (pct(sq["autoattack"]["accuracy"], sq["autoattack"]["n"])
                   if sq and sq.get("autoattack") else NOT_RUN)
    budgets, converged = budget_cell(full)
    return (f"| {name} | {epochs} | {seconds} | {clean_full} | {clean_1k} | {worst} | {auto} | "
            f"{with_square} | {budgets} | {converged} |")


def header(n_clean: int = 10000, n_attack: int = 1000) -> str:
    clean = "10,000 test" if n_clean == 10000 else f"first {n_clean:,}"
    return (f"| model | epochs | s / epoch | clean, {clean} | clean, first {n_attack:,} | "
            f"worst white-box, first {n_attack:,} | APGD-CE + APGD-T, first {n_attack:,} | "
            f"then Square, first {n_attack:,} | "
            "clean at budget 10 / 30 / 60 | converged within 30 |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


HEADER = header()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME=DIR[=RUN]")
    parser.add_argument("--evaluate", action="store_true",
                        help="first run the missing deqguard eval lines of each NAME=DIR=RUN "
                             "(RUN's best.safetensors, or RUN when it is a checkpoint)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --evaluate: print the lines, run nothing")
    parser.add_argument("--n-clean", type=int, default=10000,
                        help="test images of the clean and budget line (default: 10000)")
    parser.add_argument("--n-attack", type=int, default=1000,
                        help="first test images the attacks run on (default: 1000); other "
                             "counts than the defaults are for timing and smoke runs")
    parser.add_argument("--square", action="store_true",
                        help="with --evaluate: also run the fourth line, APGD-CE + APGD-T + "
                             "Square (about twice the third line's time on a DEQ)")
    parser.add_argument("--eval-args", default="", metavar="ARGS",
                        help="extra deqguard eval options for every line, one string, e.g. "
                             "--eval-args='--data-dir DIR' (default: none)")
    args = parser.parse_args(argv)
    try:
        specs = [parse_spec(s) for s in args.models]
        if args.evaluate:
            extra = shlex.split(args.eval_args)
            for spec, (_, folder, _, ckpt) in zip(args.models, specs, strict=True):
                if args.dry_run:
                    if ckpt is None:
                        raise HeadlineError(f"{spec!r}: --evaluate needs NAME=DIR=RUN")
                    for _, line in eval_lines(ckpt, folder, args.n_clean, args.n_attack, extra,
                                              args.square):
                        print(shlex.join(line))
                else:
                    evaluate(spec, args.n_clean, args.n_attack, extra, args.square)
            if args.dry_run:
                return 0
    except HeadlineError as exc:
        print(f"bench/headline.py: error: {exc}", file=sys.stderr)
        return 2
    print(header(args.n_clean, args.n_attack))
    for spec in args.models:
        print(row(spec, args.n_clean, args.n_attack))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
