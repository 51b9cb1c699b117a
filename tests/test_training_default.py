"""The shipped default checkpoint loads by name and scores what its metadata claims."""

from __future__ import annotations

import pytest
import torch
from conftest import FASHION_DIR

from deqguard.models import load_checkpoint, resolve_checkpoint

N_TEST = 1000


def test_default_checkpoint_reaches_its_recorded_test_accuracy():
    path = resolve_checkpoint("default")
    assert path.is_file(), f"the shipped default {path} is missing from the package"
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    from deqguard.training.data import load_dataset

    torch.set_num_threads(1)
    model, meta = load_checkpoint("default", device="cpu")
    claimed = meta.metrics["test_clean_accuracy"]
    assert meta.metrics["test_clean_images"] == N_TEST
    assert meta.training["preset"] == "fashion-wk-regulated"
    assert "deqguard train --preset fashion-wk-regulated" in meta.training["command"]
    assert meta.detection is not None and meta.detection["threshold"] is not None
    test = load_dataset("fashion-mnist", "test", limit=N_TEST)
    x = torch.stack([test[i][0] for i in range(N_TEST)])
    y = torch.tensor([test[i][1] for i in range(N_TEST)])
    correct = 0
    with torch.no_grad():
        for lo in range(0, N_TEST, 250):
            correct += int((model(x[lo:lo + 250]).argmax(1) == y[lo:lo + 250]).sum())
    assert abs(correct / N_TEST - claimed) <= 0.01
