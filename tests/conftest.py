"""Shared fixtures: small generated data and a tiny checkpoint trained here, in seconds.

Threads are pinned to one per process: on a 2-core machine a server and a client that both use two
intra-op threads have been seen to run 70x slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [f"shape{i}" for i in range(4)]


def make_pattern_images(n: int, num_classes: int = 4, size: int = 28, channels: int = 1,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is the position of a bright square: learnable in seconds."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.uniform(0.0, 0.3, (n, channels, size, size)).astype(np.float32)
    half = size // 2
    for i, k in enumerate(y):
        r, c = divmod(int(k) % 4, 2)
        x[i, :, r * half + 3: r * half + half - 3, c * half + 3: c * half + half - 3] += 0.6
    return np.clip(x, 0, 1), y.astype(np.int64)


@pytest.fixture(scope="session")
def pattern_data():
    return make_pattern_images(512)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, pattern_data) -> Path:
    """A tiny DEQ trained for a few dozen steps on the pattern data, saved as a checkpoint."""
    import torch
    import torch.nn.functional as F

    from deqguard.models import build_model, save_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in pattern_data)
    model = build_model("tiny", num_classes=len(CLASSES), width=16, head_width=32)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path, {
        "name": "tiny-test", "classes": CLASSES,
        "training": {"command": "tests/conftest.py::tiny_checkpoint", "steps": 60},
        "metrics": {"train_clean_accuracy": acc},
    })
    return path


def write_idx_dataset(root: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    """Pattern images as Fashion-MNIST IDX .gz files, so `--data-dir root` trains on them."""
    import gzip

    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = make_pattern_images(n, seed=s)
        pixels = (x[:, 0] * 255).round().astype(np.uint8)
        head = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in pixels.shape)
        images = gzip.compress(head + pixels.tobytes())
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(images)
        head = bytes([0, 0, 8, 1]) + int(n).to_bytes(4, "big")
        labels = y.astype(np.uint8).tobytes()
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + labels))
    return root


@pytest.fixture(scope="session")
def pattern_idx_dir(tmp_path_factory) -> Path:
    """A folder of Fashion-MNIST-format files holding the 4-class pattern data (512 + 128)."""
    return write_idx_dataset(tmp_path_factory.mktemp("pattern-idx"))


@pytest.fixture(scope="session")
def served_url(tiny_checkpoint, tmp_path_factory) -> str:
    """Base URL (http://127.0.0.1:PORT) of a REAL `bentoml serve deqguard.serving.service:DEQGuard`
    serving `tiny_checkpoint` on the torch backend with default settings (CPU, 1 thread, caps:
    max_iter 100, 8 MiB bodies, 256 images per request). Started once per test session, /readyz
    already 200 when you get it, stopped at the end of the session. Share it: do not restart it.
    The server's log is `server.log` in a pytest temp dir (shown if start-up fails). For a server
    with other settings use `serving_server.serve(checkpoint, log_path, DEQGUARD_...=...)`.
    """
    from serving_server import serve

    log = tmp_path_factory.mktemp("served") / "server.log"
    with serve(tiny_checkpoint, log) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The fixture checkpoint loaded on the CPU in eval mode, shared: tests must not train it."""
    import torch

    from deqguard.models import load_checkpoint

    torch.set_num_threads(1)
    model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    return model
