"""One training run: data, model, objective, epochs, validation, checkpoints, resumption.

`train` runs one to completion; `Trainer` holds its state. The work is split by job:
    seeds       every random draw derived from (seed, epoch, step, rank): exact resumption
    run_setup   device, model config, optimizer and learning-rate schedule from the config
    epoch       the training step and the epoch loop with its validation (`EpochLoop`)
    run_files   checkpoints, train_log.jsonl and the resume state in `--out` (`RunFiles`)
    selection   the best epoch, the overfitting stop, the final test check (`RunSelection`)

Output folder (`--out`, default runs/<preset>; its name is the checkpoints' default name): see
deqguard.training.run_files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models import build_model
from ..models.classifier import Classifier
from ..models.errors import DeqguardError
from . import distributed
from .config import TrainConfig, resolve
from .data import DatasetInfo, data_fingerprint, dataset_info, load_dataset
from .epoch import EpochLoop
from .graphs import DepthGraphs
from .precision import choose_precision
from .run_files import BEST, LAST, RunFiles
from .run_setup import make_optimizer, make_scheduler, model_config_for, pick_device
from .seeds import derive_seed
from .selection import RunSelection
from .warm_start import warm_start
from .weight_average import WeightAverage


@dataclass
class RunResult:
    out_dir: Path
    last: Path
    best: Path
    metrics: dict[str, Any]
    epochs: int  # trained in all, resumed epochs included; `best` may be an earlier one's
    is_main: bool = True  # the process that wrote the checkpoints (rank 0 under torchrun)


class Trainer(EpochLoop, RunFiles, RunSelection):
    """Holds one run's state; `run()` trains to the configured number of epochs."""

    def __init__(self, cfg: TrainConfig, *, out_dir: str | os.PathLike, resume: bool = False,
                 argv: list[str] | None = None, preset: str | None = None,
                 name: str | None = None):
        self.argv = list(sys.argv if argv is None else argv)
        self.preset = preset or cfg.name
        self.out = Path(out_dir)
        # The checkpoints are named after the run, not the preset: a smoke run of the preset
        # the shipped model came from must not pass for it wherever the name is shown.
        self.name = name or self.out.resolve().name
        self._name_given = name is not None
        self.device = pick_device(cfg.train.device)
        self.dist = distributed.init_from_env(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        # bf16 autocast over fp32 parameters; refused early on a CPU that would only emulate it
        self.precision = choose_precision(cfg.train.amp, self.device.type)
        self.amp = self.precision.bf16
        if self.precision.note and self.dist.is_main:
            print(f"deqguard train: {self.precision.note}", file=sys.stderr)

        d = cfg.data
        self.info = dataset_info(d.dataset, d.data_dir)
        if d.image_size is not None:
            self.info = DatasetInfo(self.info.classes, self.info.in_channels, d.image_size)
        model_cfg = model_config_for(cfg, self.info)
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        try:
            self.model: Classifier = build_model(model_cfg)
        except ValueError as exc:  # e.g. a width the normalisation groups do not divide
            raise DeqguardError(f"cannot build the model {cfg.model.overrides}: {exc}") from None
        self.model.to(self.device)
        if cfg.train.channels_last:  # 4-D weights only; later load_state_dict copies keep it
            self.model.to(memory_format=torch.channels_last)
        self.cfg = resolve(cfg, getattr(model_cfg, "solver", None))
        self.fingerprint = data_fingerprint(d.dataset, d.data_dir)
        common = {"data_dir": d.data_dir, "val_size": d.val_size, "seed": d.split_seed,
                  "download": d.download, "image_size": d.image_size}
        self.train_set = load_dataset(d.dataset, "train", augment=d.augment, limit=d.limit,
                                      **common)
        self.val_set = load_dataset(d.dataset, "val", limit=self.cfg.eval.val_limit, **common)
        self.common = common
        self.resident = self._resident_batches()
        b, w = self.cfg.train.batch_size, self.dist.world_size
        self.steps_per_epoch = len(self.train_set) // (b * w)
        if self.steps_per_epoch == 0:
            raise DeqguardError(f"{len(self.train_set)} training images make no full batch of "
                                f"{b} x {w} processes: lower train.batch_size or raise --limit")
        if cfg.rectifier.weight > 0 and getattr(self.model, "rectifier", None) is None:
            raise DeqguardError("rectifier.weight > 0 needs a model with a rectifier head: "
                                "--set model.overrides.rectifier.hidden=64 (or any field of it)")
        if cfg.rectifier.freeze_backbone:
            freeze_backbone(self.model)
        self.graphs = (DepthGraphs(self.model)
                       if cfg.train.cuda_graphs and self.device.type == "cuda"
                       and self.model.is_deq else None)
        if cfg.train.cuda_graphs and self.graphs is None and self.dist.is_main:
            print(f"deqguard train: train.cuda_graphs is for an equilibrium model on CUDA; "
                  f"this run trains eagerly on {self.device.type}", file=sys.stderr)
        # the average starts at the first step this invocation trains (a resume may move it)
        self.ema = (WeightAverage(self.model, cfg.train.ema_decay, 0)
                    if cfg.train.ema_decay > 0 else None)
        self.ema_best: dict[str, Any] = {"value": -math.inf, "epoch": None}
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                        self.cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.optim,
                                        self.cfg.train.epochs * self.steps_per_epoch)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best = {"value": -math.inf, "epoch": None}
        self.tally_state: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.init: dict[str, Any] | None = None
        self.segments: list[dict[str, Any]] = []
        if not self._start(resume) and cfg.train.init_from:
            # a resumed run has its weights and its parent's provenance in the resume state
            self.init = warm_start(self.model, model_cfg, cfg.train.init_from)
        self.segment = self._new_segment()
        distributed.broadcast_parameters(self.model)

    def run(self) -> RunResult:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_log()
        while self.epoch < cfg.train.epochs:
            entry = self.run_epoch()
            metrics = self._epoch_metrics(entry)
            improved = self._improves(entry)
            self.epoch += 1
            self.step = 0
            self.history.append(entry)
            if self.dist.is_main:
                self._save_epoch(metrics, improved=improved, best_epoch=entry["epoch"])
                if self.ema is not None:
                    self._save_average(entry, improved=self._improves(entry, average=True))
                self._append_log(entry)
                print(json.dumps(entry), file=sys.stderr)
            self._save_resume(None)
            distributed.barrier()
            if self._overfitted():
                break
        final = self._finish()
        return RunResult(self.out, self.out / LAST, self.out / BEST, final, self.epoch,
                         self.dist.is_main)


def freeze_backbone(model: Classifier) -> None:
    """Only the rectifier head keeps learning: the classifier's weights, and so its answers and
    their robustness, stay those the run starts from."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("rectifier."))


def train(cfg: TrainConfig, *, out_dir: str | os.PathLike, resume: bool = False,
          argv: list[str] | None = None, preset: str | None = None,
          name: str | None = None) -> RunResult:
    """Train one run to completion (or continue it with `resume=True`); `name` names its
    checkpoints (default: the output folder's name)."""
    try:
        return Trainer(cfg, out_dir=out_dir, resume=resume, argv=argv, preset=preset,
                       name=name).run()
    finally:
        distributed.shutdown()
