"""How many iterations and how much time each forward solver needs to reach a tolerance.

Not a test: it prints a table measured in one run, with every solver's ratio to naive iteration
on the same model and inputs (issue target: Anderson/Broyden <= 0.5x naive iterations on a
trained model).

    .venv/bin/python bench/solvers.py                       # tiny and large at random init
    .venv/bin/python bench/solvers.py --checkpoint m.safetensors --batch 256
    .venv/bin/python bench/solvers.py --presets tiny --threads 2
    .venv/bin/python bench/solvers.py --checkpoint default --solvers anderson-list anderson

`anderson-list` is Anderson with the stacked-list history it used before the ring buffer
(still the path for exact backprop); against `anderson` (ring buffer, incremental Gram) it gives
the time per solver iteration before and after that change.

A sample that does not reach `--tol` within the budget counts `max_iter` iterations; the
`converged` column says how many did, and the median last relative residual how close the rest
got. Inputs: the Fashion-MNIST test set when the model reads
28x28x1 images and the files are present (/usr/share/datasets/fashion-mnist), else uniform noise
(always for `large` at random init: there is no CIFAR-10 on disk here).
"""

from __future__ import annotations

import argparse
import gzip
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from deqguard.models import build_model, load_checkpoint, register_solver
from deqguard.models.solvers import anderson_solve

FASHION_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SOLVERS = ("naive", "anderson", "broyden")
register_solver("anderson-list", partial(anderson_solve, history="list"))


def fashion_images(n: int) -> torch.Tensor | None:
    """The first n Fashion-MNIST test images in [0, 1], or None when the files are absent."""
    if not FASHION_IMAGES.exists():
        return None
    with gzip.open(FASHION_IMAGES, "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)
    images = raw.reshape(-1, 1, 28, 28)[:n].astype(np.float32) / 255.0
    return torch.from_numpy(images)


def bench_inputs(model, batch: int, data: str, seed: int) -> tuple[torch.Tensor, str]:
    c, s = model.config.in_channels, model.config.image_size
    if data != "random" and (c, s) == (1, 28):
        x = fashion_images(batch)
        if x is not None:
            return x, "fashion-mnist test"
    if data == "fashion":
        raise SystemExit(f"no Fashion-MNIST inputs for a {c}x{s}x{s} model")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, c, s, s, generator=g), "uniform noise"


def normalise(x: torch.Tensor, meta) -> torch.Tensor:
    """Apply the checkpoint's input normalisation, as a server would."""
    if meta is None or meta.input.mean is None:
        return x
    mean = torch.tensor(meta.input.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.input.std or [1.0] * len(meta.input.mean)).view(1, -1, 1, 1)
    return (x - mean) / std


def run_solver(model, x: torch.Tensor, solver: str, max_iter: int, tol: float,
               trajectory: bool, repeats: int) -> dict:
    with torch.no_grad():
        model.solve(x[:2], solver=solver, max_iter=2, tol=tol, trajectory=False)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = model.solve(x, solver=solver, max_iter=max_iter, tol=tol, trajectory=trajectory)
            times.append(time.perf_counter() - t0)
    return {
        "iters": r.iterations.float().mean().item(),
        "conv": r.converged.float().mean().item(),
        "res": r.residual[-1].median().item(),
        "time": min(times),
        "steps": r.residual.shape[0],  # steps the batch ran (its slowest sample's count)
    }


def bench_model(label: str, model, x: torch.Tensor, source: str, args, max_iter: int) -> None:
    model.eval()
    cfg = model.config
    print(f"\n## {label}: {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {len(x)}, "
          f"max_iter {max_iter}, tol {args.tol}, inputs: {source}")
    rows = {s: run_solver(model, x, s, max_iter, args.tol, args.trajectory, args.repeats)
            for s in args.solvers}
    base = rows.get("naive")
    print("| solver | mean iters | converged | median last residual | wall s | ms/sample "
          "| ms/step | iters vs naive | time vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in rows.items():
        it_ratio = f"{r['iters'] / base['iters']:.2f}x" if base else "-"
        t_ratio = f"{r['time'] / base['time']:.2f}x" if base else "-"
        print(f"| {s} | {r['iters']:.1f} | {100 * r['conv']:.0f}% | {r['res']:.1e} | "
              f"{r['time']:.2f} | {1000 * r['time'] / len(x):.1f} | "
              f"{1000 * r['time'] / r['steps']:.1f} | {it_ratio} | {t_ratio} |")
    if "anderson" in rows and "anderson-list" in rows:
        new, old = rows["anderson"], rows["anderson-list"]
        ratio = (new["time"] / new["steps"]) / (old["time"] / old["steps"])
        print(f"\nAnderson time per solver step, ring history vs list history: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="bench this trained model instead of random-init presets")
    p.add_argument("--presets", nargs="+", default=["tiny", "large"],
                   help="random-init presets to bench (default: tiny large)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--large-batch", type=int, default=16,
                   help="batch for `large` (batch 128 takes minutes per solver on one core)")
    p.add_argument("--large-max-iter", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="time the best of N solves")
    p.add_argument("--data", choices=["auto", "fashion", "random"], default="auto")
    p.add_argument("--trajectory", action="store_true",
                   help="also decode the entropy trajectory (what serving does)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(f"# bench/solvers.py: torch {torch.__version__}, {args.threads} thread(s), CPU")
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint, device="cpu")
        x, source = bench_inputs(model, args.batch, args.data, args.seed)
        bench_model(f"checkpoint {args.checkpoint} ({meta.model['arch']})", model,
                    normalise(x, meta), source, args, args.max_iter)
        return
    for preset in args.presets:
        torch.manual_seed(args.seed)
        model = build_model(preset, num_classes=10)
        batch, max_iter = args.batch, args.max_iter
        if preset in ("large", "xl"):
            batch, max_iter = args.large_batch, args.large_max_iter
        x, source = bench_inputs(model, batch, args.data, args.seed)
        bench_model(f"{preset} (random init)", model, x, source, args, max_iter)


if __name__ == "__main__":
    main()
