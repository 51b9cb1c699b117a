"""The tiny fixture checkpoint has learnt the patterns, and its recipe learns for any seed.

Many tests (serving, scoring, clients, eval) lean on `tiny_checkpoint` having learnt; the slow
sweep below is the evidence that it does so with a margin and not by the luck of one seed.
"""

from __future__ import annotations

import pytest
from conftest import (
    TINY_MAX_STEPS,
    TINY_TARGET_ACCURACY,
    make_pattern_images,
    train_tiny_deq,
)


def test_tiny_checkpoint_learns_the_patterns(tiny_checkpoint, pattern_data):
    import torch

    from deqguard.models import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint, device="cpu")
    x, y = (torch.from_numpy(a) for a in pattern_data)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= TINY_TARGET_ACCURACY
    assert abs(acc - meta.metrics["train_clean_accuracy"]) < 1e-6


# Seeds 0-9 as the issue asks, plus perturbed initial weights standing in for another CPU's
# rounding (the recipe that failed did so through such last-bit differences).
SWEEP = [(s, 0.0) for s in range(10)] + [(s, 0.02) for s in range(5)]


@pytest.mark.slow
@pytest.mark.parametrize("seed,init_noise", SWEEP,
                         ids=[f"seed{s}" + ("-noisy" if n else "") for s, n in SWEEP])
def test_fixture_recipe_learns_for_every_seed(pattern_data, seed, init_noise):
    """>= 0.98 on the training set and on held-out patterns, stopping well before the cap."""
    import torch

    x, y = (torch.from_numpy(a) for a in pattern_data)
    run = train_tiny_deq(x, y, seed, init_noise=init_noise)  # raises at the cap
    xh, yh = (torch.from_numpy(a) for a in make_pattern_images(200, seed=1))
    with torch.no_grad():
        held_out = (run.model(xh).argmax(1) == yh).float().mean().item()
    print(f"seed {seed} noise {init_noise}: {run.steps} steps, train accuracy "
          f"{run.accuracy:.3f}, loss {run.loss:.3f}, held-out accuracy {held_out:.3f}")
    assert run.accuracy >= 0.98 and held_out >= 0.98
    assert run.steps <= 0.8 * TINY_MAX_STEPS  # room left: the recipe is not at its edge
