"""Checkpoints with a selective calibration for the tests (not a test module).

The calibration is made the way `deqguard eval --calibrate-selective` makes it (the evaluation's
`score_inputs` and `models.selective.calibrate`) on held-out pattern images, and written with
`update_metadata`; a hand-made learned detector with cheap features stands in for a fitted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import make_pattern_images

VAL_SEED = 7  # pattern images the fixture checkpoint was not trained on (it used seed 0)


def val_images(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_pattern_images(n, seed=VAL_SEED)
    return torch.from_numpy(x), torch.from_numpy(y)


def cheap_detector(sha256: str):
    """A learned detector over free features plus the residual: plumbing, not detection."""
    from deqguard.models.dynamics import DynamicsConfig
    from deqguard.models.learned_detector import LogisticDetector

    cfg = DynamicsConfig(jacobian_vjps=0, restart_iters=0, entropy_step=0)
    return LogisticDetector(features=["mean_entropy", "final_entropy", "log_residual"],
                            mean=[0.0, 0.0, -3.0], std=[1.0, 1.0, 1.0], coef=[1.0, 0.5, 0.2],
                            intercept=0.0, threshold=0.0, fpr=0.05, dynamics=cfg,
                            model_sha256=sha256)


def with_detector(src: str | Path, dst: Path) -> Path:
    """A copy of `src` carrying `cheap_detector` in metadata['detector']."""
    from deqguard.models import read_metadata, update_metadata

    shutil.copy(src, dst)
    update_metadata(dst, detector=cheap_detector(read_metadata(dst).sha256).model_dump(
        mode="json"))
    return dst


def calibrated_copy(src: str | Path, dst: Path, score: str = "max_softmax", n_val: int = 200
                    ) -> Path:
    """A copy of `src` with metadata['selective'] for `score` on `n_val` held-out images."""
    from deqguard.evaluation.selective import score_inputs, solve_spec
    from deqguard.models import load_checkpoint, update_metadata
    from deqguard.models.learned_detector import detector_from_metadata
    from deqguard.models.selective import calibrate

    if Path(src) != dst:
        shutil.copy(src, dst)
    model, meta = load_checkpoint(dst, device="cpu")
    x, _ = val_images(n_val)
    det = detector_from_metadata(meta)
    scores = score_inputs(model, x, [score], det).scores[score]
    cal = calibrate(scores, score, solve=solve_spec(model), model_sha256=meta.sha256,
                    detector=det, provenance={"data": "pattern images", "seed": VAL_SEED,
                                "command": "tests/selective_ckpt.py"})
    update_metadata(dst, selective=cal.model_dump(mode="json"))
    return dst


def record_dataset(path: Path, data_dir: Path) -> Path:
    """Write into the checkpoint at `path` the dataset record `deqguard train` leaves
    (training.config.data): the pattern images in Fashion-MNIST format under `data_dir`, so
    `deqguard eval` finds its data without `--data`, as it does for a trained checkpoint."""
    from deqguard.models import read_metadata, update_metadata

    training = dict(read_metadata(path).training)
    training["config"] = {"data": {"dataset": "fashion-mnist", "data_dir": str(data_dir),
                                   "val_size": 100, "split_seed": 0}}
    update_metadata(path, training=training)
    return path
