"""bench/square_gap.py: the margin it reads along a segment, and its caches, which must be rebuilt
when the checkpoint or the attacked images change (a stale cache would attribute one model's gap
to another)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_bench


@pytest.fixture(scope="module")
def square_gap():
    return load_bench("square_gap.py")


def test_margin_is_the_true_logit_minus_the_largest_other(square_gap):
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [2.0, 2.0, -1.0]])
    y = torch.tensor([0, 2, 1])
    assert square_gap.margin(logits, y).tolist() == pytest.approx([0.5, -3.0, 0.0])


def test_cache_is_rebuilt_for_another_checkpoint(square_gap, tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "square.pt"
    assert square_gap.cached(path, "sha-a", make)["value"] == 1
    assert square_gap.cached(path, "sha-a", make)["value"] == 1  # read back, not recomputed
    assert square_gap.cached(path, "sha-b", make)["value"] == 2
    assert len(calls) == 2

    # The APGD stage's key also names the images it attacked: another set is not reused.
    apgd = tmp_path / "apgd.pt"
    assert square_gap.cached(apgd, ("sha-a", (3, 7)), make)["value"] == 3
    assert square_gap.cached(apgd, ("sha-a", (3, 7)), make)["value"] == 3
    assert square_gap.cached(apgd, ("sha-a", (3, 8)), make)["value"] == 4
