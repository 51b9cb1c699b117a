"""Attacked image sets for detection experiments, crafted once and cached on disk.

Crafting PGD-40 through a DEQ on a CPU costs minutes per hundred images, and the detector is
fitted, calibrated and evaluated on the same sets many times over; so each set is written in
chunks of `chunk` images to `<cache>/<name>/<start>.npz` and a rerun skips the chunks it
already has (a killed run resumes where it stopped). The attacks do not know the detector:
detector-aware attacks live in `detector_attack.py`. One of them does know what a cheap detector
looks at: `pgd-lowent` (attacks.py, `detector_loss`) also pushes the trajectory's entropy down
once the input is misclassified, the confident mistake an entropy score cannot see.

On a DEQ the attacks backprop through every solver iteration (`exact`) unless a spec says
otherwise: a detector measured only against the phantom training gradient would be judged on
weaker attacks than the ones robustness is judged by. The gradient is part of each set's name,
so sets crafted through another path are never reused.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from deqguard.fileio import atomic_write_bytes
from deqguard.models.classifier import Classifier
from deqguard.training.attacks import pgd, pgd_ce

from .attacks import default_step_size, detector_loss, path_logits

AttackName = Literal["pgd", "apgd-ce", "pgd-lowent"]


@dataclass(frozen=True)
class CraftSpec:
    """One attack on one slice of one split; `name` is also the cache folder's name.

    `lam`: weight of the summed trajectory entropy of `pgd-lowent` (ignored by the others).
    """

    attack: AttackName
    eps: float
    steps: int
    split: str
    start: int
    count: int
    seed: int = 0
    gradient: str = "exact"
    lam: float = 0.0

    @property
    def name(self) -> str:
        lam = f"-lam{self.lam:g}" if self.attack == "pgd-lowent" else ""
        return (f"{self.split}-{self.start}-{self.count}-{self.attack}{self.steps}{lam}"
                f"-eps{self.eps:g}-{self.gradient}-s{self.seed}")


def _craft_chunk(model: Classifier, spec: CraftSpec, x: Tensor, y: Tensor, seed: int) -> Tensor:
    if spec.attack == "pgd":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        return pgd_ce(lambda xa: path_logits(model, xa, spec.gradient), x, y, eps=spec.eps,
                      step_size=default_step_size(spec.eps, spec.steps), steps=spec.steps,
                      generator=gen)
    if spec.attack == "apgd-ce":
        from pyautoattack.autopgd_base import APGDAttack

        def logits(xa: Tensor) -> Tensor:
            return path_logits(model, xa, spec.gradient)

        apgd = APGDAttack(logits, n_iter=spec.steps, norm="Linf", eps=spec.eps, seed=seed,
                          loss="ce", device=x.device)
        # best_loss=True: the highest-loss point for every input, fooled or not (the detector
        # sees failed attacks as attacks too)
        return apgd.perturb(x, y, best_loss=True).detach()
    if spec.attack == "pgd-lowent":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        # detector_loss differentiates through every solver iteration itself (exact)
        return pgd(lambda xa: detector_loss(model, xa, y, spec.lam), x, eps=spec.eps,
                   step_size=default_step_size(spec.eps, spec.steps), steps=spec.steps,
                   start="uniform", generator=gen)
    raise ValueError(f"unknown attack {spec.attack!r}")


def cached_chunks(folder: str | Path | None, n: int, make: Callable[[int, int], Tensor], *,
                  chunk: int = 50, label: str = "", log=print) -> Tensor:
    """`make(start, end)` for every chunk of range(n), concatenated; with a `folder`, each chunk
    is written to `<folder>/<start>.npz` and read back on a rerun (a killed run resumes)."""
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for s in range(0, n, chunk):
        path = None if folder is None else folder / f"{s:06d}.npz"
        if path is not None and path.exists():
            parts.append(torch.from_numpy(np.load(path)["x_adv"]))
            continue
        x_adv = make(s, min(s + chunk, n)).detach()
        if path is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, x_adv=x_adv.cpu().numpy().astype(np.float32))
            atomic_write_bytes(path, buf.getvalue())
        parts.append(x_adv.cpu())
        log(f"{label}: {min(s + chunk, n)}/{n}")
    return torch.cat(parts)


def craft(model: Classifier, spec: CraftSpec, x: Tensor, y: Tensor, cache: str | Path | None,
          *, chunk: int = 50, log=print) -> Tensor:
    """x_adv for x (the spec's slice, already cut), chunk by chunk, cached and resumable
    (`cache` None: computed, not cached)."""
    if len(x) != spec.count:
        raise ValueError(f"spec says {spec.count} images, got {len(x)}")
    folder = None if cache is None else Path(cache) / spec.name
    return cached_chunks(
        folder, len(x),
        lambda s, e: _craft_chunk(model, spec, x[s:e], y[s:e], spec.seed * 1_000_003 + s),
        chunk=chunk, label=spec.name, log=log)


# The detection experiment's sets (README, "Detection"): validation images are attacked with a
# mix of attacks and radii so the detector does not learn one attack's fingerprint; test images
# with one fixed target attack, PGD-40 at eps 0.1, so every detector is measured against the
# same attack.
VAL_PLAN: tuple[CraftSpec, ...] = (
    CraftSpec("pgd", 0.1, 20, "val", 0, 100),
    CraftSpec("pgd", 0.05, 10, "val", 100, 50),
    CraftSpec("pgd", 0.15, 10, "val", 150, 50),
    CraftSpec("apgd-ce", 0.1, 10, "val", 200, 50),
)
TEST_PLAN: tuple[CraftSpec, ...] = (CraftSpec("pgd", 0.1, 40, "test", 0, 200),)


def block_plan(specs: tuple[CraftSpec, ...], n: int, *, block: int = 50
               ) -> tuple[CraftSpec, ...]:
    """The first n images of a split in blocks of `block`, block k attacked by specs[k % len]
    (their split, start and count are replaced, and the seed becomes k).

    Blocks, not one spec of n images: a larger n reuses every cached block of a smaller one, so
    a run can grow from a quick size to the full one without crafting anything twice.
    """
    return tuple(replace(specs[k % len(specs)], start=s, count=min(block, n - s), seed=k)
                 for k, s in enumerate(range(0, n, block)))


# The same mix of attacks and radii as VAL_PLAN (2:1:1:1), for block_plan.
VAL_MIX: tuple[CraftSpec, ...] = (
    CraftSpec("pgd", 0.1, 20, "val", 0, 0), CraftSpec("pgd", 0.1, 20, "val", 0, 0),
    CraftSpec("pgd", 0.05, 10, "val", 0, 0), CraftSpec("pgd", 0.15, 10, "val", 0, 0),
    CraftSpec("apgd-ce", 0.1, 10, "val", 0, 0),
)


def with_gradient(plan: tuple[CraftSpec, ...], gradient: str) -> tuple[CraftSpec, ...]:
    """The same plan crafted through another gradient path (`deqguard detect --gradient`)."""
    return tuple(replace(spec, gradient=gradient) for spec in plan)


def split_images(split: str, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images [start, start+count) of a split as tensors."""
    from deqguard.training.data import load_dataset

    ds = load_dataset("fashion-mnist", split, start=start, limit=count)  # type: ignore[arg-type]
    if len(ds) < count:
        raise ValueError(f"the {split} split holds {len(ds)} images after the first {start}, "
                         f"not {count}")
    items = [ds[i] for i in range(count)]
    return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


def craft_plan(model: Classifier, plan: tuple[CraftSpec, ...], cache: str | Path,
               log=print) -> dict[str, Tensor]:
    out = {}
    for spec in plan:
        x, y = split_images(spec.split, spec.start, spec.count)
        out[spec.name] = craft(model, spec, x, y, cache, log=log)
    return out


if __name__ == "__main__":  # background crafting: python -m deqguard.evaluation.advsets
    import sys

    from deqguard.models import load_checkpoint

    torch.set_num_threads(1)
    ckpt, cache_dir = sys.argv[1], sys.argv[2]
    net, _ = load_checkpoint(ckpt, "cpu")
    craft_plan(net, VAL_PLAN + TEST_PLAN, cache_dir, log=lambda m: print(m, flush=True))
