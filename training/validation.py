"""Validation during training: clean and PGD accuracy, and how the solver behaves.

This is the model-selection signal (validation split, never the test set) and a quick check that
a trained model still behaves as a DEQ: most samples should converge within the default budget.
The full robustness evaluation (AutoAttack, adaptive attacks, solver-budget sweeps) lives in the
evaluation modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor

from ..models.classifier import Classifier
from ..models.device import full_fp32
from .attacks import pgd_ce
from .distributed import active, all_reduce_sum
from .objectives import eval_mode


def _batches(loader: Iterable, device: torch.device,
             progress: str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches on `device`; with a `progress` label, under a progress bar (PGD
    validation of a thousand images takes long enough on a CPU to look like a hang)."""
    if progress is None:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    from tqdm import tqdm

    total = len(loader) if isinstance(loader, Sized) else None
    with tqdm(loader, total=total, desc=progress, unit="batch", dynamic_ncols=True,
              leave=False) as bar:
        for x, y in bar:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def validate(model: Classifier, loader: Iterable, *, eps: float, step_size: float, steps: int,
             device: torch.device, generator: torch.Generator | None = None,
             progress: str | None = None, per_image: bool = False) -> dict[str, Any]:
    """Clean accuracy, PGD accuracy (the model's default solver and gradient path), and mean
    solver iterations / converged fraction on the clean inputs. Counts are summed over
    processes when running distributed. `progress`: a progress bar with this label.
    `per_image` adds which images were right, clean and attacked (`clean_correct`,
    `pgd_correct`: boolean CPU tensors in the loader's order), so that two models scored on the
    same images can be compared image by image; one process only (a distributed run's shards
    would need gathering in order).

    Always full fp32 (no bf16 autocast, no TF32 on a GPU), also for a run whose steps use bf16:
    a bf16 solve cannot reach the solver's 1e-3 tolerance, and TF32 comes close to it."""
    if per_image and active():
        raise ValueError("per-image outcomes are kept by one process only")
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    flags: dict[str, list[Tensor]] = {"clean_correct": [], "pgd_correct": []}
    with eval_mode(model), full_fp32():
        for x, y in _batches(loader, device, progress):
            with torch.no_grad():
                res = model.solve(x, trajectory=False)
            clean = res.logits.argmax(1) == y
            stats[0] += clean.sum()
            stats[2] += len(y)
            stats[3] += res.iterations.float().sum()
            stats[4] += res.converged.float().sum()
            attacked = clean
            if steps > 0 and eps > 0:
                x_adv = pgd_ce(model, x, y, eps=eps, step_size=step_size, steps=steps,
                               generator=generator)
                with torch.no_grad():
                    attacked = model(x_adv).argmax(1) == y
            stats[1] += attacked.sum()
            if per_image:
                flags["clean_correct"].append(clean.cpu())
                flags["pgd_correct"].append(attacked.cpu())
    stats = all_reduce_sum(stats)
    n = max(float(stats[2]), 1.0)
    out: dict[str, Any] = {
        "clean_accuracy": float(stats[0]) / n, "pgd_accuracy": float(stats[1]) / n,
        "mean_iterations": float(stats[3]) / n, "converged_fraction": float(stats[4]) / n,
        "images": int(stats[2])}
    if per_image:
        out.update({k: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool)
                    for k, v in flags.items()})
    return out


def clean_accuracy(model: Classifier, loader: Iterable, device: torch.device,
                   progress: str | None = None) -> float:
    """Top-1 accuracy with the model's default solver settings (what `deqguard` serves).
    `progress`: a progress bar with this label."""
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in _batches(loader, device, progress):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)

