"""Which epoch a run keeps: the best validation score, the overfitting stop, the final check.

Selection reads the validation split only (`eval.select_by`: PGD or clean accuracy); the test
split is read once, at the end, to record the clean accuracy of the last and the best checkpoint
in their metadata, never to choose between them. `RunSelection` is a part of `Trainer`
(deqguard.training.loop); the attributes it reads are set up by `Trainer.__init__`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..models import load_checkpoint, update_metadata
from ..models.classifier import Classifier
from . import distributed
from .config import SINGLE_STEP_KINDS, TrainConfig
from .data import DataError, load_dataset
from .overfit_guard import catastrophic_overfitting
from .run_files import BEST, EMA_BEST, EMA_LAST, LAST
from .validation import clean_accuracy


class RunSelection:
    """The best epoch so far, the guard that stops on overfitting, and the final test check."""

    cfg: TrainConfig
    model: Classifier
    device: torch.device
    dist: distributed.DistInfo
    out: Path
    best: dict[str, Any]
    ema_best: dict[str, Any]
    history: list[dict[str, Any]]
    common: dict[str, Any]

    def _improves(self, entry: dict[str, Any], *, average: bool = False) -> bool:
        """Record `entry`'s epoch as the best when its selection score (eval.select_by) beats
        the best so far: the run's own, or with `average` the weight average's."""
        prefix = "val_ema_" if average else "val_"
        score = entry[f"{prefix}{self.cfg.eval.select_by}_accuracy"]
        if score <= (self.ema_best if average else self.best)["value"]:
            return False
        record = {"value": score, "epoch": entry["epoch"]}
        if average:
            self.ema_best = record
        else:
            self.best = record
        return True

    def _overfitted(self) -> bool:
        """The guard: on catastrophic overfitting, restore the best epoch's weights and stop."""
        cfg = self.cfg
        if not cfg.train.overfit_guard or cfg.objective.kind not in SINGLE_STEP_KINDS:
            return False
        why = catastrophic_overfitting(self.history, cfg.train.overfit_drop)
        if why is None:
            return False
        best, _ = load_checkpoint(self.out / BEST, device=self.device)
        self.model.load_state_dict(best.state_dict())
        if self.dist.is_main:
            shutil.copyfile(self.out / BEST, self.out / LAST)  # the run ends on the best epoch
            self._append_log({"event": "overfitting", "message": why,
                              "restored_epoch": self.best["epoch"]})
            print(f"deqguard train: {why}; stopping and restoring epoch {self.best['epoch']}",
                  file=sys.stderr)
        return True

    def _finish(self) -> dict[str, Any]:
        """Test-set clean accuracy of last and best on the first `eval.test_limit` images."""
        distributed.check_in_sync(self.model)
        final: dict[str, Any] = {"event": "final", "best_epoch": self.best["epoch"],
                                 "best_value": self.best["value"]}
        if not self.dist.is_main:
            return final
        n = self.cfg.eval.test_limit
        try:
            test = load_dataset(self.cfg.data.dataset, "test", limit=n, **self.common)
        except DataError as exc:
            print(f"deqguard train: no test split, test_clean_accuracy not recorded ({exc})",
                  file=sys.stderr)
            test = None
        for name in (LAST, BEST, EMA_LAST, EMA_BEST):
            path = self.out / name
            if test is None or not path.exists():
                continue
            model, meta = load_checkpoint(path, device=self.device)
            label = self._progress(f"test ({name.split('.')[0]})")
            acc = clean_accuracy(model, self._loader(test, batch_size=self.cfg.eval.batch_size),
                                 self.device, progress=label)
            metrics = {**meta.metrics, "test_clean_accuracy": acc, "test_clean_images": len(test),
                       "test_clean_protocol": "first N test images, model default solver"}
            update_metadata(path, metrics=metrics)
            final[f"{name.split('.')[0]}_test_clean_accuracy"] = acc
        self._append_log(final)
        print(json.dumps(final), file=sys.stderr)
        return final
