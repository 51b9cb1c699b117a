"""Re-select among runs' saved checkpoints on the whole validation split.

Training keeps `best.safetensors` by PGD accuracy on `eval.val_limit` validation images (1,000 by
default, about 1.3 points of standard error) after every epoch: the largest of a hundred noisy
scores, so the kept epoch's score is biased upwards and two runs' best scores compare within that
noise. This scores each saved checkpoint of the runs given (best, last, and where the run kept a
weight average, ema and ema_best) again on the whole validation split (5,000 images for the
presets) with the runs' own validation attack (PGD-10 from a uniform start, `eval.eps` and
`eval.step_size` from the checkpoint's training config, the model's default gradient path, full
fp32) and one fixed attack seed for all. The first `eval.val_limit` images are the ones training
chose by, so they are scored apart: the ranking is by the held-out rest (4,000 images for the
presets), which no epoch was chosen on. The test split is never read: what this picks is then
evaluated on the test set once, by `bench/headline.py`.

    OMP_NUM_THREADS=2 .venv/bin/python bench/reselect.py runs/long/e100/fashion-wk-regulated \\
        runs/long/e100/fashion-wk-regulated-x2 --threads 2 --json docs/eval/wk/reselect/val.json

A checkpoint file can be named instead of a run folder. The table is printed best first (by
held-out PGD accuracy, then clean), with the binomial standard error of the held-out score, the
score on the selection images with this seed, and the score training logged for that epoch.

`--train N` also scores the first N images of the training split (as they are, without the run's
augmentation), the images its gradient steps fitted, with the same attack. Their gap to the
held-out images tells a model that overfits (far better on its own images: regularisers such as
augmentation or a weight average may help) from one that underfits (level: only more capacity or
training can); it never enters the ranking.

`--paired` then compares every checkpoint with the first one found (a run folder's best) image
by image (evaluation/paired.py: the paired difference, its bootstrap interval and McNemar's
test), on the held-out images and, with `--train`, on the training images: runs whose recorded
splits agree were scored on the same images, and the rows keep each image's outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from deqguard.evaluation.eval_command import recorded_data
from deqguard.evaluation.paired import paired_difference
from deqguard.evaluation.per_sample import bits, unbits
from deqguard.models import load_checkpoint
from deqguard.models.errors import DeqguardError
from deqguard.training.data import load_dataset
from deqguard.training.run_files import BEST, EMA_BEST, EMA_LAST, LAST
from deqguard.training.validation import validate

CANDIDATES = (BEST, LAST, EMA_LAST, EMA_BEST)
PER_IMAGE = ("clean_correct", "pgd_correct")  # validate()'s per-image outcomes
PART_NAMES = {"selection": "selection", "held_out": "held-out", "train": "training"}


def candidates(paths: list[str]) -> list[Path]:
    """The checkpoint files named, and every saved checkpoint of each run folder named."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = [path / name for name in CANDIDATES if (path / name).is_file()]
            if not files:
                raise DeqguardError(f"{path}: no {', '.join(CANDIDATES)} in this folder")
            found.extend(files)
        else:
            raise DeqguardError(f"{path}: no such checkpoint or run folder")
    return found


def revalidate(path: Path, *, seed: int, device: torch.device, data_dir: str | None = None,
               train_images: int = 0) -> dict[str, Any]:
    """One checkpoint as a table row: the images its run chose epochs by, and the held-out rest,
    scored apart (then, with `train_images`, that many training images). The split is rebuilt
    from the checkpoint's own training config (dataset, size, seed), never from flags: another
    size or seed would carve training images into it."""
    model, meta = load_checkpoint(path, device=device)
    trained_data = recorded_data(meta)
    trained_eval = meta.trained_config("eval")
    dataset, eps = trained_data.get("dataset"), trained_eval.get("eps")
    if dataset is None or eps is None:
        raise DeqguardError(f"{path}: its metadata records no training config with a dataset and "
                            "a validation eps (not made by `deqguard train`?)")
    step_size = trained_eval.get("step_size") or eps / 4
    steps = int(trained_eval.get("steps", 10))
    carved = {"data_dir": data_dir or trained_data.get("data_dir"),
              "val_size": int(trained_data.get("val_size", 5000)),
              "seed": int(trained_data.get("split_seed", 0)),
              "image_size": trained_data.get("image_size")}
    split = load_dataset(dataset, "val", **carved)
    seen = min(int(trained_eval.get("val_limit") or len(split)), len(split))
    if seen >= len(split):
        raise DeqguardError(f"{path}: all {len(split)} validation images chose the epoch "
                            "(eval.val_limit covers the split): none is held out")
    to_score = [("selection", split, range(seen)), ("held_out", split, range(seen, len(split)))]
    if train_images:
        # only the images the run trained on (its data.limit, if any); scored last, so that the
        # validation parts' attack draws are the same with and without them
        train = load_dataset(dataset, "train", limit=trained_data.get("limit"), **carved)
        to_score.append(("train", train, range(min(train_images, len(train)))))
    generator = torch.Generator(device=device).manual_seed(seed)
    batch = int(trained_eval.get("batch_size", 256))
    start = time.perf_counter()
    parts = {}
    for name, images, indices in to_score:
        if len(indices):
            parts[name] = score(validate(
                model, DataLoader(Subset(images, indices), batch_size=batch), eps=eps,
                step_size=step_size, steps=steps, device=device, generator=generator,
                per_image=True))
    return {
        "checkpoint": str(path), "epoch": meta.metrics.get("epoch"), **parts,
        # what decides which images were scored: rows that agree on it can be paired
        "split": {"dataset": dataset, "selection": seen, **carved, "data_dir": None,
                   "train_limit": trained_data.get("limit") if train_images else None},
        "trained_val_images": meta.metrics.get("val_images"),
        "trained_val_clean_accuracy": meta.metrics.get("val_clean_accuracy"),
        "trained_val_pgd_accuracy": meta.metrics.get("val_pgd_accuracy"),
        "attack": {"eps": eps, "step_size": step_size, "steps": steps, "seed": seed,
                   "start": "uniform", "gradient": "model default"},
        "seconds": round(time.perf_counter() - start, 1),
    }


def score(scores: dict[str, Any]) -> dict[str, Any]:
    """validate()'s numbers with the standard error of the PGD accuracy, and its per-image
    outcomes as the strings reports keep them in."""
    n, pgd = scores["images"], scores["pgd_accuracy"]
    outcomes = {k: bits(scores[k]) for k in PER_IMAGE}
    return {**scores, **outcomes, "pgd_stderr": math.sqrt(pgd * (1 - pgd) / max(n, 1))}


def paired_rows(rows: list[dict[str, Any]], part: str = "held_out") -> str:
    """Each row after the first against the first, image by image on `part` (clean and PGD):
    two checkpoints' scores on the same images share most right and wrong answers, so their
    difference is far better known than their two standard errors suggest."""
    ref = rows[0]
    lines = [f"Paired against {ref['checkpoint']} on the {PART_NAMES[part]} images "
             "(A - B, 95% bootstrap interval, McNemar's exact p):", "",
             "| checkpoint (A) | measure | A | B | A - B | 95% interval | only A / only B | p |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows[1:]:
        if r["split"] != ref["split"] or part not in r or part not in ref:
            lines.append(f"| {r['checkpoint']} | not the same images | | | | | | |")
            continue
        for label, key in (("clean", "clean_correct"), ("PGD", "pgd_correct")):
            d = paired_difference(unbits(r[part][key]), unbits(ref[part][key]))
            lo, hi = d.interval
            lines.append(
                f"| {r['checkpoint']} | {label} | {_pct(d.accuracy_a)} | {_pct(d.accuracy_b)} "
                f"| {100 * d.difference:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"| {d.only_a} / {d.only_b} | {d.p_value:.2g} |")
    return "\n".join(lines)


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["held_out"]["pgd_accuracy"],
                                       -r["held_out"]["clean_accuracy"], r["checkpoint"]))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown; `candidates` refuses an empty list, so there is a first row. With
    training images scored, a column gives their clean / PGD accuracy beside the held-out one."""
    held = rows[0]["held_out"]["images"]
    seen = rows[0].get("selection", {}).get("images", 0)
    steps = rows[0]["attack"]["steps"]
    trained = rows[0].get("train", {}).get("images", 0)
    fitted = [f"training images' clean / PGD-{steps}, {trained:,}"] if trained else []
    lines = ["| " + " | ".join([
        "checkpoint", "epoch", f"held-out clean, {held:,}", f"held-out PGD-{steps}, {held:,}",
        *fitted, f"selection images' PGD-{steps}, {seen:,}", "as trained: val clean / PGD",
        "iterations", "converged", "s"]) + " |",
        "|---|" + "---:|" * (8 + len(fitted))]
    for r in rows:
        h, s, t = r["held_out"], r.get("selection"), r.get("train")
        fit = ([f"{_pct(t['clean_accuracy'])} / {_pct(t['pgd_accuracy'])}" if t else "n/a"]
               if fitted else [])
        lines.append("| " + " | ".join([
            r["checkpoint"], str(r["epoch"]) if r["epoch"] is not None else "n/a",
            _pct(h["clean_accuracy"]), f"{_pct(h['pgd_accuracy'])} ± {100 * h['pgd_stderr']:.1f}",
            *fit, _pct(s["pgd_accuracy"] if s else None),
            f"{_pct(r['trained_val_clean_accuracy'])} / {_pct(r['trained_val_pgd_accuracy'])}",
            f"{h['mean_iterations']:.1f}", f"{100 * h['converged_fraction']:.1f}%",
            f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or checkpoint files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PGD random starts")
    parser.add_argument("--data-dir", help="where the dataset's files are, if not where training "
                        "read them (the split's size and seed always come from the checkpoint)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train", type=int, default=0, metavar="N",
                        help="also score the first N training images (unaugmented), to set the "
                             "fit on them beside the held-out score (default: 0, none)")
    parser.add_argument("--paired", action="store_true",
                        help="also compare every checkpoint with the first one found, image by "
                             "image on the held-out images (and on the training images with "
                             "--train)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.train < 0:
        parser.error(f"--train takes a count of images, not {args.train}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        rows = []
        for path in candidates(args.paths):
            rows.append(revalidate(path, seed=args.seed, device=device, data_dir=args.data_dir,
                                   train_images=args.train))
            held = rows[-1]["held_out"]
            print(f"[reselect] {path}: held-out clean {_pct(held['clean_accuracy'])}, PGD "
                  f"{_pct(held['pgd_accuracy'])}, {rows[-1]['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    except DeqguardError as exc:
        print(f"reselect: {exc}", file=sys.stderr)
        return 2
    named = rows
    rows = ranked(rows)
    print(table(rows))
    if args.paired and len(named) > 1:
        for part in ("held_out", "train") if args.train else ("held_out",):
            print("\n" + paired_rows(named, part))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", "bench/reselect.py",
                                                              *(argv or sys.argv[1:])]),
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
