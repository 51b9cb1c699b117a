"""Recipe and design searches: one `deqguard train` run per named grid entry, then one table.

A baseline is judged with its own best recipe, never only the DEQ's, so each model
family has a grid here; every row of the printed table is a `deqguard train` command (printed
with it) and the validation split's numbers (the test set is not used for the choice). Runs are
resumable: an entry whose log has its final line is skipped, an unfinished one continues, and
an entry another runner is training is left to it, so two runners can share a grid.

    python bench/recipes.py --grid anchor --epochs 15 --root runs/search/anchor --threads 1
    python bench/recipes.py --grid deq-designs --epochs 10 --root runs/search/deq --threads 1
    python bench/recipes.py --grid anchor --root runs/search/anchor --table   # table only
    python bench/recipes.py --grid lr --epochs 10 --root runs/long/lr-search --threads 1
    python bench/recipes.py --grid clean --epochs 4 --root runs/long/clean-search --threads 1 \
        --only regulated-clean0.25,regulated-clean0.5
    python bench/recipes.py --grid long --epochs 60 --root runs/long/e60 --threads 1 \
        --only anchor-e60
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from deqguard.training.device_window import PLANS
from deqguard.training.device_window import WIDE as WINDOW_WIDE

FGSM_RS = ["objective.kind=fgsm-rs", "objective.step_size=0.125"]
N_FGSM = ["objective.kind=n-fgsm", "objective.step_size=0.1", "objective.noise=2.0"]
PGD7 = ["objective.kind=pgd-at", "objective.steps=7", "objective.step_size=0.025"]
CLEAN = ["objective.clean_weight=0.5"]  # the published PGD-AT models' half-clean batches
AUG = ["data.augment=true"]
# twice as wide everywhere (stem channels and fc hidden; the overrides `deqguard window --plan
# capacity` trains with, so the GPU runs are the model searched here), fp32 in channels_last
CPU_FP32 = ["train.amp=off", "train.channels_last=true"]
WIDE = [*WINDOW_WIDE, *CPU_FP32]


def capacity_run(name: str) -> tuple[str, list[str]]:
    """A run of `deqguard window --plan capacity` on the CPU: the same preset, rate, width and
    weight average, so the 60-epoch runs here and the plan's 100-epoch ones train one recipe."""
    preset, sets = PLANS["capacity"]["runs"][name]
    return preset, [*sets, *CPU_FP32]


# name -> (preset, overrides)
GRIDS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "anchor": {
        "fgsm-rs": ("fashion-cnn-wk", FGSM_RS),
        "fgsm-rs-clean": ("fashion-cnn-wk", FGSM_RS + CLEAN),
        "fgsm-rs-aug": ("fashion-cnn-wk", FGSM_RS + AUG),
        "n-fgsm": ("fashion-cnn-wk", N_FGSM),
        "n-fgsm-clean": ("fashion-cnn-wk", N_FGSM + CLEAN),
        "n-fgsm-aug": ("fashion-cnn-wk", N_FGSM + AUG),
        "pgd7": ("fashion-cnn-wk", PGD7),
        "pgd7-clean": ("fashion-cnn-wk", PGD7 + CLEAN),
        "pgd7-aug": ("fashion-cnn-wk", PGD7 + AUG),
    },
    # the design study runs every design with N-FGSM, the cheap recipe, with and without the
    # regulation (the presets now hold the DEQs' best recipe, PGD-7, found by deq-recipes)
    "deq-designs": {
        "fc-e1-regulated": ("fashion-wk-regulated", N_FGSM),
        "fc-e1-plain": ("fashion-wk-plain", N_FGSM),
        "fc-e2-regulated": ("fashion-wk-regulated", N_FGSM + ["model.overrides.expansion=2"]),
        "fc-e2-plain": ("fashion-wk-plain", N_FGSM + ["model.overrides.expansion=2"]),
        "pool-e2-regulated": ("fashion-wk-regulated", N_FGSM + ["model.overrides.expansion=2",
                                                                "model.overrides.head=pool"]),
        "pool-e2-plain": ("fashion-wk-plain", N_FGSM + ["model.overrides.expansion=2",
                                                        "model.overrides.head=pool"]),
    },
    # N-FGSM is the fc-e1 rows of deq-designs; these try the anchor's best on both DEQs
    "deq-recipes": {
        "regulated-pgd7": ("fashion-wk-regulated", PGD7),
        "plain-pgd7": ("fashion-wk-plain", PGD7),
        "regulated-fgsm-rs": ("fashion-wk-regulated", FGSM_RS),
    },
    # the short learning-rate search before the equal-budget runs: each model gets its own best
    # peak learning rate (one-cycle, the presets' schedule), judged on validation PGD-10
    "lr": {
        "anchor-lr2e-3": ("fashion-cnn-wk", ["optim.lr=2.0e-3"]),
        "anchor-lr5e-3": ("fashion-cnn-wk", ["optim.lr=5.0e-3"]),
        "anchor-lr1e-2": ("fashion-cnn-wk", ["optim.lr=1.0e-2"]),
        "anchor-lr2e-2": ("fashion-cnn-wk", ["optim.lr=2.0e-2"]),  # 1e-2 led: past the edge
        "regulated-lr1e-3": ("fashion-wk-regulated", ["optim.lr=1.0e-3"]),
        "regulated-lr2e-3": ("fashion-wk-regulated", ["optim.lr=2.0e-3"]),
        "regulated-lr4e-3": ("fashion-wk-regulated", ["optim.lr=4.0e-3"]),
        "regulated-lr8e-3": ("fashion-wk-regulated", ["optim.lr=8.0e-3"]),  # 4e-3 led: the edge
        "regulated-lr1.6e-2": ("fashion-wk-regulated", ["optim.lr=1.6e-2"]),  # 8e-3 led again
        "regulated-lr3.2e-2": ("fashion-wk-regulated", ["optim.lr=3.2e-2"]),  # 1.6e-2 led again
        # the two DEQs whose 100-epoch runs borrowed the regulated DEQ's 1.6e-2: the expansion-2
        # cell and the plain DEQ, each bracketed around it (`--epochs 4`, fp32 as above, in
        # channels_last as their long runs; only compared among themselves)
        **{f"{model}-lr{lr}": (preset, [f"optim.lr={lr}", *sets, "train.amp=off",
                                        "train.channels_last=true"])
           for model, preset, sets in (
               ("x2", "fashion-wk-regulated", ["model.overrides.expansion=2"]),
               ("plain", "fashion-wk-plain", []))
           for lr in ("1.6e-2", "8e-3", "3.2e-2")},
    },
    # the Jacobian weight at the regulated DEQ's searched rate (`--epochs 4`, as the lr grid);
    # weight 1.0, the preset's, is the lr grid's regulated-lr1.6e-2
    "jacobian": {
        "regulated-jac0.5": ("fashion-wk-regulated", ["optim.lr=1.6e-2", "jacobian.weight=0.5"]),
        "regulated-jac2": ("fashion-wk-regulated", ["optim.lr=1.6e-2", "jacobian.weight=2.0"]),
    },
    # clean mixing (the published PGD-AT models' half-clean batches), a lever for issue 30's
    # 88% clean aim, at each model's searched rate and the lr grid's lengths (`--epochs 4` for
    # the DEQ, `--epochs 10` for the anchor): the baselines are that grid's regulated-lr1.6e-2
    # and anchor-lr1e-2. fp32 as they were (amp auto would pick bf16 on an AMX CPU)
    "clean": {
        f"{model}-clean{w}": (preset, [lr, f"objective.clean_weight={w}", "train.amp=off"])
        for model, preset, lr in (("regulated", "fashion-wk-regulated", "optim.lr=1.6e-2"),
                                  ("anchor", "fashion-cnn-wk", "optim.lr=1.0e-2"))
        for w in ("0.25", "0.5")
    },
    # TRADES (Zhang et al. 2019: CE on the clean batch + beta KL to the adversarial one), the
    # other lever for the 88% clean aim, on each model at its searched rate and the lr grid's
    # lengths and precision (`--epochs 4` for the DEQ, `--epochs 10` for the anchor; baselines:
    # that grid's regulated-lr1.6e-2 and anchor-lr1e-2); beta 6 is the paper's, smaller betas
    # weigh the clean term more
    "trades": {
        **{f"{model}-trades{beta}": (preset, [
            lr, "objective.kind=trades", f"objective.beta={beta}", "train.amp=off"])
           for model, preset, lr, betas in (
               ("regulated", "fashion-wk-regulated", "optim.lr=1.6e-2", ("1", "3", "6")),
               ("anchor", "fashion-cnn-wk", "optim.lr=1.0e-2", ("3", "6")))
           for beta in betas},
        # the PGD-AT control for longer screens (`--epochs 10`, root runs/long/trades-e10): at 4
        # epochs it is the lr grid's regulated-lr1.6e-2, which ran in fp32 without the flag
        "regulated-pgd-at": ("fashion-wk-regulated", ["optim.lr=1.6e-2", "train.amp=off"]),
    },
    # clean mixing as a fine-tune of the shipped default (`--epochs 8`, root
    # runs/long/ft-clean): its weights, a tenth of its peak rate with a short rise, then down
    "clean-finetune": {
        f"regulated-cw{w}": ("fashion-wk-regulated", [
            "train.init_from=models/weights/default.safetensors", f"objective.clean_weight={w}",
            "optim.lr=1e-3", "optim.warmup_fraction=0.1", "train.amp=off",
            "train.channels_last=true"])
        for w in ("0.25", "0.5")
    },
    # capacity: the 100-epoch runs fit their own training images no better than they generalise
    # (docs/eval/wk/fit-gap.md), so both models twice as wide everywhere (stem channels and fc
    # hidden), at the lr grid's rates and lengths (`--epochs 4` for the DEQ, `--epochs 10` for
    # the anchor; baselines: that grid's regulated-lr1.6e-2, x2-lr1.6e-2 and anchor-lr1e-2).
    # `MODEL-w2` takes the narrow model's rate; `MODEL-w2-lrX` bracket it for the wide one (the
    # wide anchor led at 5e-3, the bracket's edge, on held-out images: 2.5e-3 is one further)
    "width": {
        f"{model}-w2{'' if lr == narrow else f'-lr{lr}'}": (preset, [f"optim.lr={lr}", *WIDE])
        for model, preset, narrow, rates in (
            ("regulated", "fashion-wk-regulated", "1.6e-2", ("8e-3", "1.6e-2", "3.2e-2")),
            ("anchor", "fashion-cnn-wk", "1.0e-2", ("2.5e-3", "5e-3", "1.0e-2", "2e-2")))
        for lr in rates
    },
    # the equal-budget runs (`--epochs 60`), each model at its own best rate from the lr grid;
    # the regulated DEQ has one entry per rate still in contention, and only the winner is run
    "long": {
        "anchor-e60": ("fashion-cnn-wk", ["optim.lr=1.0e-2"]),
        "regulated-e60-lr4e-3": ("fashion-wk-regulated", ["optim.lr=4.0e-3"]),
        "regulated-e60-lr8e-3": ("fashion-wk-regulated", ["optim.lr=8.0e-3"]),
        "regulated-e60-lr1.6e-2": ("fashion-wk-regulated", ["optim.lr=1.6e-2"]),
        "regulated-e60-lr3.2e-2": ("fashion-wk-regulated", ["optim.lr=3.2e-2"]),
        # both models twice as wide at their rates from the width grid's brackets, with a
        # weight average beside each (docs/eval/wk/width.md)
        "regulated-w2-e60": capacity_run("fashion-wk-regulated-w2"),
        "anchor-w2-e60": capacity_run("fashion-cnn-wk-w2"),
        # the same two at the capacity plan's length (`--epochs 100 --root runs/long/e100`): the
        # wide DEQ still fitted its training batches better every epoch at 60
        "regulated-w2-e100": capacity_run("fashion-wk-regulated-w2"),
        "anchor-w2-e100": capacity_run("fashion-cnn-wk-w2"),
    },
}


def command(preset: str, sets: list[str], out: Path, epochs: int | None) -> list[str]:
    cmd = ["deqguard", "train", "--preset", preset, "--out", str(out), "--no-progress",
           "--resume"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def log_rows(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def finished(out: Path) -> bool:
    return any(r.get("event") == "final" for r in log_rows(out))


def claim(out: Path) -> Path | None:
    """A lock file in the run folder, or None when a live runner holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".runner.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or "0")
            os.kill(pid, 0)
            return None
        except (ValueError, ProcessLookupError):  # left by a runner that died
            lock.unlink(missing_ok=True)
            return claim(out)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return lock


def table(grid: dict[str, tuple[str, list[str]]], root: Path, epochs: int | None) -> str:
    lines = ["| entry | epochs | s / epoch | train img/s | val clean (last) | val PGD-10 (last) "
             "| best val PGD-10 (epoch) | val mean iters | command |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, (preset, sets) in grid.items():
        out = root / name
        epochs_rows = [r for r in log_rows(out) if "epoch" in r and "event" not in r]
        cmd = shlex.join(command(preset, sets, out, epochs))
        if not epochs_rows:
            lines.append(f"| {name} | 0 | | | | | | | `{cmd}` |")
            continue
        last = epochs_rows[-1]
        best = max(epochs_rows, key=lambda r: r["val_pgd_accuracy"])
        secs = sum(r["train_seconds"] for r in epochs_rows) / len(epochs_rows)
        iters = last.get("val_mean_iterations")
        lines.append(
            f"| {name} | {last['epoch']} | {secs:.0f} | {last['images_per_second']:.0f} "
            f"| {last['val_clean_accuracy']:.1%} | {last['val_pgd_accuracy']:.1%} "
            f"| {best['val_pgd_accuracy']:.1%} ({best['epoch']}) "
            f"| {iters:.1f} | `{cmd}` |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), required=True)
    ap.add_argument("--root", type=Path, required=True, help="one run folder per entry")
    ap.add_argument("--epochs", type=int, help="train.epochs for every entry (default: preset)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--only", help="comma list of entries to run")
    ap.add_argument("--table", action="store_true", help="print the table, train nothing")
    args = ap.parse_args()
    grid = GRIDS[args.grid]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(grid))
        if unknown:
            ap.error(f"unknown entries {unknown}; {args.grid} has {sorted(grid)}")
        grid = {k: v for k, v in grid.items() if k in wanted}
    if not args.table:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        exe = Path(sys.executable).with_name("deqguard")
        for name, (preset, sets) in grid.items():
            out = args.root / name
            if finished(out):
                continue
            lock = claim(out)
            if lock is None:  # another runner of the same grid has it (two cores, two runners)
                continue
            cmd = command(preset, sets, out, args.epochs)
            print(f"[recipes] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            try:
                rc = subprocess.call([str(exe), *cmd[1:]], env=env)
            finally:
                lock.unlink(missing_ok=True)
            if rc != 0:
                print(f"[recipes] {name} exited with {rc}", file=sys.stderr, flush=True)
    print(table(grid, args.root, args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
