"""What each feature group of the learned detector costs a request, and what it catches.

    OMP_NUM_THREADS=1 python bench/detect_cost.py --checkpoint default --n-fit 300 --n-test 300 \
        --md docs/eval/wk/default/detector-cost.md --json docs/eval/wk/default/detector-cost.json

Per feature group (evaluation/detector_groups.py: the trajectory alone, each probe added to it,
and the full set) one table row: the AUROC and the flagged share of successful attacks of a
logistic detector fitted on that group alone, against exact-gradient PGD-40 and against the
low-entropy PGD-40, next to the group's extra f evaluations and its ms per answer at each batch
size: `model.solve(x, features=cfg)` against the plain `model.solve(x)` (a request with
detect=false), in-process, in rounds that interleave every variant in a rotating order, medians
and the per-round ratio's spread reported. The attacked sets and features are cached under
--cache (one folder per weights): a rerun only times and fits, and a larger --n-fit / --n-test
reuses every block a smaller run crafted. `--skip-detection` only times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.models.dynamics import DynamicsConfig

Variant = DynamicsConfig | None  # None: the plain solve


def time_variants(model: Any, x: Tensor, variants: dict[str, Variant], *, batch_size: int,
                  rounds: int, clock: Callable[[], float] = time.perf_counter,
                  as_pairs: bool = False) -> dict[str, dict[str, float]]:
    """Per variant: median ms per answer over `rounds`, and its per-round ratio to "plain".

    Every round solves all of `x` (in batches of `batch_size`) once per variant, the order
    rotated by one each round, so load that drifts over the run hits every variant alike; the
    ratio is taken within a round. `variants` must hold "plain" (None: no features).
    `as_pairs`: each image solved as the pair [x, x], as the server answers a lone request
    (serving/engine.py `trace`, batch invariance); one answer per pair.
    """
    if variants.get("plain", 0) is not None:
        raise ValueError("variants need a 'plain' entry (None)")

    def run(cfg: Variant) -> None:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size]
                if as_pairs:
                    xb = torch.cat([xb, xb])
                if cfg is None:
                    model.solve(xb)
                else:
                    model.solve(xb, features=cfg)

    names = list(variants)
    for name in names:  # warm-up: allocators, lazy init
        run(variants[name])
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            run(variants[name])
            seconds[name].append(clock() - t0)
    out = {}
    for name in names:
        ratios = [t / p for t, p in zip(seconds[name], seconds["plain"], strict=True)]
        out[name] = {"ms_per_answer": 1000 * statistics.median(seconds[name]) / len(x),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)}
    return out


def _load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--cache", default="runs/detect",
                   help="root of the attacked sets and features (one folder per weights)")
    p.add_argument("--n-fit", type=int, default=300, help="attacked validation images (fit)")
    p.add_argument("--n-cal", type=int, default=300, help="clean validation images (threshold)")
    p.add_argument("--n-test", type=int, default=300, help="test images per test attack")
    p.add_argument("--lam", type=float, default=0.1,
                   help="entropy weight of the low-entropy attack (as eval's detector attack)")
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--batch-sizes", default="1,pair,32",
                   help="comma list of batch sizes; `pair`: each image solved as the pair "
                        "[x, x], the way the server answers a lone request")
    p.add_argument("--time-images", type=int, default=64,
                   help="images solved per variant and round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-detection", action="store_true", help="only time the groups")
    p.add_argument("--json", help="write everything here")
    p.add_argument("--md", help="write the table here")
    args = p.parse_args(argv)

    from deqguard.evaluation.advsets import split_images
    from deqguard.evaluation.detector_cli import checkpoint_cache
    from deqguard.evaluation.detector_fit import save_json
    from deqguard.evaluation.detector_groups import (
        collect_sets,
        group_configs,
        group_detection,
        markdown_table,
    )
    from deqguard.models import load_checkpoint
    from deqguard.models.learned_detector import detector_from_metadata

    torch.set_num_threads(args.threads)
    t_start = time.time()
    model, meta = load_checkpoint(args.checkpoint, "cpu")
    shipped = detector_from_metadata(meta)
    base = shipped.dynamics if shipped else DynamicsConfig()
    configs = group_configs(base)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "checkpoint": args.checkpoint,
                              "sha256": meta.sha256, "threads": args.threads,
                              "shipped_features": shipped.features if shipped else None,
                              "load_before": _load_avg()}
    if not args.skip_detection:
        # every feature once (each group reads its own columns), whatever the shipped set
        sets = collect_sets(model, checkpoint_cache(args.cache, meta.sha256), configs["all"],
                            n_fit=args.n_fit, n_cal=args.n_cal, n_test=args.n_test,
                            lam=args.lam, log=lambda m: print(m, flush=True))
        report["sets"] = sets.described
        report["detection"] = group_detection(sets, configs, fpr=args.fpr, reps=args.reps)
        print(f"detection done at {time.time() - t_start:.0f}s", flush=True)
    x, _ = split_images("test", 0, args.time_images)
    variants: dict[str, Variant] = {"plain": None, **configs}
    report["timing"] = {}
    for b in args.batch_sizes.split(","):
        t = time_variants(model, x, variants, batch_size=1 if b == "pair" else int(b),
                          rounds=args.rounds, as_pairs=b == "pair")
        report["timing"][str(b)] = t
        print(f"batch {b}: " + ", ".join(f"{k} {v['ms_per_answer']:.2f} ms "
                                         f"({v['ratio']:.2f}x)" for k, v in t.items()),
              flush=True)
    report["load_after"] = _load_avg()
    report["seconds"] = time.time() - t_start
    by_group = {g: {b: report["timing"][b][g] for b in report["timing"]} for g in configs}
    if "detection" in report:
        table = markdown_table(report["detection"], by_group)
        plain = ", ".join(f"batch {b}: {report['timing'][b]['plain']['ms_per_answer']:.2f} ms"
                          for b in report["timing"])
        text = (f"{table}\nplain solve per answer: {plain}; load average "
                f"{report['load_before']} before, {report['load_after']} after\n")
        print(text, flush=True)
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(text)
    if args.json:
        save_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
