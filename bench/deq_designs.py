"""The design study as one table: DEQs at the anchor CNN's cost, with and without the
paper's regulation, next to the anchor itself.

Each row is a run of a `bench/recipes.py` grid (its `deqguard train` command) plus one
`deqguard eval` of its best-by-validation checkpoint (printed with the table), so every number in
the row comes from a command in the row:

    python bench/deq_designs.py --root runs/search/deq --anchor runs/search/anchor/n-fgsm \
        --evals runs/search/eval --epochs 10 --run-evals --threads 1
    python bench/deq_designs.py ... > docs/eval/designs.md       # the table only, once evaluated

MACs per solver iteration count one evaluation of f (the multiply-accumulates of its
convolutions and linear layers) for one image; the anchor's column is its whole forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from recipes import GRIDS, command, log_rows

from deqguard.models import load_checkpoint

EVAL = ["--data", "fashion-mnist", "--n", "1000", "--attacks", "clean,pgd,aa", "--aa-attacks",
        "apgd-ce", "--paths", "exact", "--pgd-steps", "20", "--intermediate", "",
        "--steps-sweep", "", "--eps-sweep", "", "--sweep-n", "100", "--batch-size", "500",
        "--no-progress"]


def eval_command(checkpoint: Path, out: Path) -> list[str]:
    return ["deqguard", "eval", str(checkpoint), *EVAL, "--json", str(out)]


def macs(module: torch.nn.Module, fn) -> int:
    """Multiply-accumulates of the Conv2d / Linear layers of `module` during fn()."""
    total = 0

    def hook(m, inputs, output):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += output[0].numel() * k
        elif isinstance(m, torch.nn.Linear):
            total += output[0].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total


def cost(model: torch.nn.Module) -> tuple[int, int]:
    """(MACs of one solver iteration or, for a feedforward model, of the forward; parameters)."""
    c = model.config
    x = torch.rand(1, c.in_channels, c.image_size, c.image_size)
    params = sum(p.numel() for p in model.parameters())
    if not model.is_deq:
        return macs(model, lambda: model(x)), params
    u = model.inject(x)
    z = model.initial_state(u)
    return macs(model, lambda: model.layer(z, u)), params


def row(name: str, run: Path, evals: Path, epochs: int | None, preset: str,
        sets: list[str]) -> tuple[str, list[str]]:
    rows = [r for r in log_rows(run) if "epoch" in r and "event" not in r]
    ckpt = run / "best.safetensors"
    report_path = evals / f"{name}.json"
    cmds = [shlex.join(command(preset, sets, run, epochs)),
            shlex.join(eval_command(ckpt, report_path))]
    if not rows or not ckpt.exists():
        return f"| {name} | not trained | " + " |" * 10, cmds
    model, meta = load_checkpoint(ckpt, device="cpu")
    per_iter, params = cost(model)
    cfg = meta.training.get("config", {})
    regulated = bool(cfg.get("regulation", {}).get("enabled")) and model.is_deq
    last = rows[-1]
    best_epoch = meta.metrics.get("best_epoch", meta.metrics.get("epoch"))
    train_iters = last.get("train_mean_iterations")
    cells = [name, ("yes" if regulated else "no") if model.is_deq else "-", f"{params:,}",
             f"{per_iter / 1e6:.2f}M", f"{train_iters:.1f}" if train_iters else "1",
             f"{last['images_per_second']:.0f}", f"{last['epoch']} (best {best_epoch})"]
    if report_path.exists():
        rep = json.loads(report_path.read_text())
        attacks = {a["name"]: a["accuracy"] for a in rep.get("attacks", [])}
        pgd = next((v for k, v in attacks.items() if k.startswith("pgd20")), None)
        aa = (rep.get("autoattack") or {}).get("accuracy")
        cl = rep["clean"]
        cells += [f"{cl['mean_iterations']:.1f}", f"{cl['converged_fraction']:.1%}",
                  f"{cl['accuracy']:.1%}", f"{pgd:.1%}" if pgd is not None else "",
                  f"{aa:.1%}" if aa is not None else ""]
    else:
        cells += ["", "", "", "", ""]
    return "| " + " | ".join(cells) + " |", cmds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the deq-designs grid's runs")
    ap.add_argument("--anchor", type=Path, help="the anchor CNN's run folder")
    ap.add_argument("--anchor-sets", default="n-fgsm",
                    help="the anchor grid entry that run is (for its command)")
    ap.add_argument("--evals", type=Path, required=True, help="folder of eval JSON reports")
    ap.add_argument("--epochs", type=int, help="the --epochs the grid ran with")
    ap.add_argument("--anchor-epochs", type=int, help="the --epochs the anchor's grid ran with")
    ap.add_argument("--run-evals", action="store_true", help="evaluate rows not evaluated yet")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    entries = [(n, args.root / n, p, s) for n, (p, s) in GRIDS["deq-designs"].items()]
    if args.anchor:
        p, s = GRIDS["anchor"][args.anchor_sets]
        entries.insert(0, (f"anchor CNN ({args.anchor_sets})", args.anchor, p, s))
    if args.run_evals:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        exe = Path(sys.executable).with_name("deqguard")
        args.evals.mkdir(parents=True, exist_ok=True)
        for name, run, _, _ in entries:
            out = args.evals / f"{name}.json"
            if out.exists() or not (run / "best.safetensors").exists():
                continue
            cmd = eval_command(run / "best.safetensors", out)
            print(f"[designs] {shlex.join(cmd)}", file=sys.stderr, flush=True)
            subprocess.call([str(exe), *cmd[1:]], env=env, stdout=subprocess.DEVNULL)
    print("| design | regulated | params | MACs / solver iteration (anchor: forward) "
          "| mean train iterations | train img/s | epochs | mean test iterations "
          "| converged within 30 | clean | exact PGD-20 | exact APGD-CE |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    commands = []
    for name, run, preset, sets in entries:
        epochs = args.anchor_epochs if name.startswith("anchor CNN") else args.epochs
        line, cmds = row(name, run, args.evals, epochs, preset, sets)
        print(line)
        commands.append((name, cmds))
    print("\nCommands, per row (train, then eval):\n")
    for name, cmds in commands:
        print(f"- {name}:")
        for c in cmds:
            print(f"  - `{c}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
