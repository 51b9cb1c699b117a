"""`deqguard window`: train and evaluate the default and its baselines in one device window.

A GPU is lent to a session for 15 minutes at most, start-up included, and one command may run 10
minutes; what it writes comes back only as a few files. So one prepared command does it all:
train each preset (resumable runs, the data resident on the device), stop training at a deadline
that leaves time to evaluate, evaluate every run that produced a checkpoint with the same
`deqguard eval` line, and pack the runs, logs and reports into one archive plus a summary.
Without a GPU the same command runs on the CPU with fewer epochs (tests do, on tiny data).

    deqguard window --out runs/window --epochs 30 --batch-size 512 --jobs 3 --deadline-s 540 \
        --data-dir .devdata/fashion-mnist --pack $OUT/window.tar.gz

`--plan equal-budget` trains the equal-budget study instead (each model at its own learning
rate, 100 epochs, the longest runs first), `--plan capacity` the same study for both models twice
as wide; `--serve-bench` ends the window with the serving
benchmark (bench/cuda_serve.py) on the device. docs/gpu-window.md has the device command.

Every command it ran is in summary.json, next to what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from deqguard.errors import DeqguardError

# the regulated DEQ (the default's preset), the same DEQ without the regulation, the anchor CNN
WINDOW_PRESETS = ("fashion-wk-regulated", "fashion-wk-plain", "fashion-cnn-wk")
EVAL_PARTS = "clean,budget,pgd,aa"

# run name -> (preset, overrides), in start order: the longest runs first, so that with fewer
# jobs than runs the short ones fill in behind and none starts late and long. Each model trains
# at its own peak rate from the lr search (docs/eval/wk/lr-search.md); the plain DEQ was not
# searched and takes the regulated DEQ's (same architecture, so only the regulation differs).
# Every run keeps a weight average (train.ema_decay, which never changes the run itself): the
# DEQs' began mid-run, on the CPU; the anchor's 100 epochs had finished without one, so the
# anchor trains again beside them with it from the start.
EMA = "train.ema_decay=0.999"
WIDE = ["model.overrides.channels=[32,64]", "model.overrides.hidden=200"]
PLANS: dict[str, dict[str, Any]] = {
    "equal-budget": {
        "epochs": 100,
        "runs": {
            "fashion-wk-regulated-x2": ("fashion-wk-regulated",
                                        ["optim.lr=1.6e-2", "model.overrides.expansion=2", EMA]),
            "fashion-wk-regulated": ("fashion-wk-regulated", ["optim.lr=1.6e-2", EMA]),
            "fashion-wk-plain": ("fashion-wk-plain", ["optim.lr=1.6e-2", EMA]),
            "fashion-cnn-wk": ("fashion-cnn-wk", ["optim.lr=1.0e-2"]),
            "fashion-cnn-wk-ema": ("fashion-cnn-wk", ["optim.lr=1.0e-2", EMA]),
        },
    },
    # capacity (docs/eval/wk/width.md): the regulated DEQ and the anchor CNN twice as wide
    # everywhere (stem channels and fc hidden), each at its rate from the width grid's bracket
    "capacity": {
        "epochs": 100,
        "runs": {
            "fashion-wk-regulated-w2": ("fashion-wk-regulated", ["optim.lr=1.6e-2", *WIDE, EMA]),
            "fashion-cnn-wk-w2": ("fashion-cnn-wk", ["optim.lr=5e-3", *WIDE, EMA]),
        },
    },
}
DEFAULT_EPOCHS = 30
SERVE_BENCH = "bench/cuda_serve.py"


def _deqguard() -> list[str]:
    return [sys.executable, "-m", "deqguard.cli"]


def train_command(preset: str, out: Path, args: argparse.Namespace,
                  sets: list[str] | None = None) -> list[str]:
    """`sets`: the run's own overrides, before the window's --set (which may still change them)."""
    cmd = ["deqguard", "train", "--preset", preset, "--out", str(out), "--resume",
           "--no-progress", "--epochs", str(_epochs(args)), "--device", args.device]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    for s in [*(sets or []), *(args.set or [])]:
        cmd += ["--set", s]
    return cmd


def _epochs(args: argparse.Namespace) -> int:
    if args.epochs is not None:
        return args.epochs
    return PLANS[args.plan]["epochs"] if args.plan else DEFAULT_EPOCHS


def planned_runs(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Run name -> (preset, overrides): the plan's runs, else one run per --presets entry."""
    if args.plan:
        return dict(PLANS[args.plan]["runs"])
    presets = args.presets if args.presets is not None else ",".join(WINDOW_PRESETS)
    return {p: (p, []) for p in presets.split(",") if p}


def _serve_script() -> Path:
    """bench/ is not installed: the checkout's, found beside this package (an editable install,
    as on the device) or under the working folder."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / SERVE_BENCH).exists():
            return root / SERVE_BENCH
    raise DeqguardError(f"--serve-bench needs {SERVE_BENCH} of a checkout (run from its root)")


def serve_command(out: Path, args: argparse.Namespace) -> list[str]:
    cmd = ["python", str(_serve_script()), "--checkpoint", args.serve_checkpoint,
           "--device", args.device, "--json", str(out / "serve.json")]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd + shlex.split(args.serve_args or "")


def eval_command(checkpoint: Path, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = ["deqguard", "eval", str(checkpoint), "--data", "fashion-mnist", "--n",
           str(args.eval_n), "--attacks", EVAL_PARTS, "--aa-attacks", "apgd-ce,apgd-t",
           "--aa-n", str(args.aa_n), "--sweep-n", str(min(args.aa_n, args.eval_n)),
           "--batch-size", str(args.eval_batch_size), "--device", args.device,
           "--json", str(out / "eval.json"), "--report", str(out / "report"), "--no-progress"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd + shlex.split(args.eval_args or "")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_all(commands: dict[str, list[str]], *, jobs: int, deadline: float, threads: int,
            logs: Path) -> dict[str, dict[str, Any]]:
    """Run the commands, `jobs` at a time; kill what is still running at `deadline`."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    done: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < jobs and time.time() < deadline:
            name, cmd = pending.pop(0)
            fh = (logs / f"{name}.log").open("w")
            print(f"[window] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            argv = [*_deqguard(), *cmd[1:]] if cmd[0] == "deqguard" else [sys.executable,
                                                                           *cmd[1:]]
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=_env(threads))
            running[name] = (proc, time.time(), fh)
        if not running:  # the deadline passed before these could start
            for name, cmd in pending:
                done[name] = {"command": shlex.join(cmd), "returncode": None, "seconds": 0.0,
                              "stopped_at_deadline": True}
            break
        time.sleep(0.5)
        for name, (proc, t0, fh) in list(running.items()):
            late = time.time() >= deadline
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            fh.close()
            done[name] = {"command": shlex.join(commands[name]), "returncode": proc.returncode,
                          "seconds": round(time.time() - t0, 1), "stopped_at_deadline": late}
            del running[name]
    return done


def _train_summary(run_dir: Path) -> dict[str, Any]:
    rows = []
    log = run_dir / "train_log.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "epoch" in row and "event" not in row:
                rows.append(row)
    if not rows:
        return {"epochs_completed": 0}
    secs = [r["train_seconds"] for r in rows]
    return {"epochs_completed": rows[-1]["epoch"],
            "train_seconds_per_epoch": round(sum(secs) / len(secs), 2),
            "train_seconds_first_epoch": secs[0],
            "train_seconds_per_epoch_after_first": (round(sum(secs[1:]) / len(secs[1:]), 2)
                                                    if len(secs) > 1 else None),
            "images_per_second_last_epoch": rows[-1]["images_per_second"],
            "val_clean_accuracy": rows[-1]["val_clean_accuracy"],
            "val_pgd_accuracy": rows[-1]["val_pgd_accuracy"],
            "val_mean_iterations": rows[-1]["val_mean_iterations"],
            "val_converged_fraction": rows[-1]["val_converged_fraction"]}


def _eval_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    out: dict[str, Any] = {"n": report["settings"]["n"]}
    if report.get("clean"):
        out["clean_accuracy"] = report["clean"]["accuracy"]
        out["converged_fraction"] = report["clean"]["converged_fraction"]
    if report.get("worst_case"):
        out["worst_case_accuracy"] = report["worst_case"]["accuracy"]
    if report.get("autoattack"):
        out["autoattack_accuracy"] = report["autoattack"]["accuracy"]
        out["autoattack_n"] = report["autoattack"].get("n")
    out["attacks"] = {a["name"]: a["accuracy"] for a in report.get("attacks", [])}
    out["warnings"] = report.get("warnings", [])
    return out


def _environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    return env


def deadlines(start: float, args: argparse.Namespace) -> tuple[float, float, float]:
    """(train, eval, end): the serving benchmark keeps its --serve-bench-s at the end, and
    training stops --eval-share of the rest before evaluation's deadline."""
    if not args.deadline_s:
        return float("inf"), float("inf"), float("inf")
    end = start + args.deadline_s
    evals = end - (args.serve_bench_s if args.serve_bench else 0.0)
    return start + (evals - start) * (1 - args.eval_share), evals, end


def commands(args: argparse.Namespace) -> dict[str, Any]:
    """Every command the window would run, by stage (evaluations for every run; the window
    itself evaluates only those that left a checkpoint)."""
    out = Path(args.out)
    plan = planned_runs(args)
    cmds: dict[str, Any] = {
        "train": {n: train_command(p, out / "runs" / n, args, sets) for n, (p, sets) in
                  plan.items()},
        "eval": {n: eval_command(_checkpoint(out / "runs" / n), out / "eval" / n, args)
                 for n in plan}}
    if args.serve_bench:
        cmds["serve"] = {"serve": serve_command(out / "serve", args)}
    return cmds


def window(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(args)
    names = list(cmds["train"])
    train_deadline, eval_deadline, deadline = deadlines(start, args)
    runs = {n: out / "runs" / n for n in names}
    trained = run_all(cmds["train"], jobs=args.jobs, deadline=train_deadline,
                      threads=args.threads, logs=out / "logs" / "train")
    evals = {n: c for n, c in cmds["eval"].items() if _checkpoint(runs[n]).exists()}
    evaluated = run_all(evals, jobs=args.jobs, deadline=eval_deadline, threads=args.threads,
                        logs=out / "logs" / "eval")
    summary: dict[str, Any] = {"environment": _environment(), "presets": {},
                               "seconds_total": None,
                               "arguments": {k: v for k, v in vars(args).items() if k != "func"}}
    for n in names:
        summary["presets"][n] = {
            "train": {**trained.get(n, {}), **_train_summary(runs[n])},
            "checkpoint": str(_checkpoint(runs[n])) if _checkpoint(runs[n]).exists() else None,
            "eval": {**evaluated.get(n, {}), **_eval_summary(out / "eval" / n / "eval.json")},
        }
    if args.serve_bench:  # alone on the device: after every other job has ended
        served = run_all(cmds["serve"], jobs=1, deadline=deadline, threads=args.threads,
                         logs=out / "logs" / "serve")["serve"]
        result = out / "serve" / "serve.json"
        summary["serve"] = {**served, "result": (json.loads(result.read_text())
                                                 if result.exists() else None)}
    summary["seconds_total"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.pack:
        pack(out, Path(args.pack), resume=args.pack_resume)
    return summary


def _checkpoint(run_dir: Path) -> Path:
    """best.safetensors: chosen by validation PGD accuracy, never by the test set."""
    return run_dir / "best.safetensors"


def pack(folder: Path, archive: Path, *, resume: bool = False) -> None:
    """One archive of the window's folder: a device returns a handful of files, not a tree.

    resume.pt files stay out (optimizer state, several times the weights) unless `resume`: runs
    longer than one window need them to continue in the next; the checkpoints, logs and reports
    go in.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if (path.is_file() and (resume or path.name != "resume.pt")
                    and path.resolve() != archive.resolve()):
                tar.add(path, arcname=str(path.relative_to(folder.parent)))


def _window(args: argparse.Namespace) -> int:
    if args.plan and args.presets is not None:
        raise DeqguardError(f"--plan {args.plan} names its own runs: leave out --presets")
    if args.dry_run:
        print(json.dumps({stage: {n: shlex.join(c) for n, c in cs.items()}
                          for stage, cs in commands(args).items()}, indent=2))
        return 0
    summary = window(args)
    short = {p: {"epochs": s["train"].get("epochs_completed"),
                 "s/epoch": s["train"].get("train_seconds_per_epoch"),
                 "clean": s["eval"].get("clean_accuracy"),
                 "worst_case": s["eval"].get("worst_case_accuracy"),
                 "autoattack": s["eval"].get("autoattack_accuracy")}
             for p, s in summary["presets"].items()}
    print(json.dumps({"out": args.out, "seconds_total": summary["seconds_total"],
                      "presets": short}, indent=2))
    if "serve" in summary:
        print(json.dumps({"serve": {k: summary["serve"].get(k)
                                    for k in ("returncode", "seconds", "stopped_at_deadline")}}))
    failed = [p for p, s in summary["presets"].items() if s["checkpoint"] is None]
    return 1 if failed or summary.get("serve", {}).get("returncode", 0) != 0 else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "window", help="train and evaluate the default and its baselines in one device window",
        description="Train each preset (resumable, stopped at a deadline), evaluate every run "
                    "that left a checkpoint with the same deqguard eval line, write summary.json "
                    "and optionally pack everything into one archive.")
    p.add_argument("--out", required=True, help="folder for runs/, eval/, logs/, summary.json")
    p.add_argument("--presets", help="comma-separated presets to train (default: "
                                      f"{','.join(WINDOW_PRESETS)})")
    p.add_argument("--plan", choices=sorted(PLANS),
                   help="train a named set of runs instead of --presets, each with its own "
                        "overrides; equal-budget: the regulated DEQ at expansion 2, the regulated "
                        "and plain DEQs at lr 1.6e-2, the anchor CNN at 1e-2, 100 epochs each, "
                        "longest first; capacity: the regulated DEQ and the anchor CNN twice as "
                        "wide, 100 epochs each")
    p.add_argument("--epochs", type=int,
                   help=f"train.epochs of every run (default: the plan's, else {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, help="train.batch_size (default: each preset's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where runs train and evaluate (default: auto, the GPU if there is one)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, help="data.limit: the first N training images")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="training config override for every preset (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (3 on a large GPU)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run")
    p.add_argument("--deadline-s", type=float, help="stop everything this many seconds in")
    p.add_argument("--eval-share", type=float, default=0.35,
                   help="share of --deadline-s kept for evaluation (training stops before)")
    p.add_argument("--eval-n", type=int, default=1000, help="test images for clean/PGD")
    p.add_argument("--aa-n", type=int, default=1000, help="test images for APGD-CE + APGD-T")
    p.add_argument("--eval-batch-size", type=int, default=500,
                   help="deqguard eval --batch-size of every run (default: %(default)s)")
    p.add_argument("--eval-args", help="more deqguard eval options for every run, one string")
    p.add_argument("--serve-bench", action="store_true",
                   help="end with the serving benchmark (bench/cuda_serve.py) on the device, "
                        "alone; its JSON goes into summary.json and the archive")
    p.add_argument("--serve-checkpoint", default="default",
                   help="checkpoint the serving benchmark serves (default: %(default)s)")
    p.add_argument("--serve-bench-s", type=float, default=90.0,
                   help="seconds at the end of --deadline-s kept for it (default: %(default)s)")
    p.add_argument("--serve-args", help="more bench/cuda_serve.py options, one string")
    p.add_argument("--pack", help="write a .tar.gz of --out here")
    p.add_argument("--pack-resume", action="store_true",
                   help="put the runs' resume.pt in the archive too, to resume in a later window")
    p.add_argument("--dry-run", action="store_true",
                   help="print every command the window would run, as JSON, and run none")
    p.set_defaults(func=_window)
