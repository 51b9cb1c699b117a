"""What a training run writes into its folder, and how it reads its own folder back.

    last.safetensors   weights + metadata after every epoch (deqguard checkpoint, atomic)
    best.safetensors   the epoch with the best validation PGD accuracy (clean: eval.select_by)
    train_log.jsonl    one JSON line per epoch, then one {"event": "final"} line
    resume.pt          optimizer/scheduler/position, every `save_every_steps` steps and per epoch
    ema.safetensors    with train.ema_decay: the weight average after every epoch (named
                       NAME-ema; `training.weight_average` says from which step), and
    ema_best.safetensors  the average at its own best validation epoch

`RunFiles` is a part of `Trainer` (deqguard.training.loop); the attributes it reads are set up by
`Trainer.__init__`. The metadata written here is what `deqguard serve`, `deqguard eval` and the
end-of-run summary read back, so a checkpoint says on its own how it was made. A run resumed on
another machine (started on a GPU, finished on a CPU) keeps one `segments` entry per invocation:
the top-level device, precision and command are only the last one's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from deqguard.provenance import invocation

from ..models import save_checkpoint
from ..models.classifier import Classifier
from ..models.device import device_name, tf32_flags
from ..models.errors import DeqguardError
from . import distributed
from .config import TrainConfig
from .data import DatasetInfo
from .precision import Precision
from .resume import RESUME_FILE, ResumeError, load_state, save_state
from .weight_average import WeightAverage

LAST, BEST, LOG = "last.safetensors", "best.safetensors", "train_log.jsonl"
EMA_LAST, EMA_BEST = "ema.safetensors", "ema_best.safetensors"


class RunFiles:
    """Checkpoints, the epoch log and the resume state of one run (a part of `Trainer`)."""

    cfg: TrainConfig
    model: Classifier
    device: torch.device
    dist: distributed.DistInfo
    amp: bool
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path
    name: str
    _name_given: bool
    preset: str
    argv: list[str]
    info: DatasetInfo
    fingerprint: str
    train_set: Dataset
    val_set: Dataset
    epoch: int
    step: int
    global_step: int
    best: dict[str, Any]
    tally_state: dict[str, float] | None
    history: list[dict[str, Any]]
    init: dict[str, Any] | None
    segments: list[dict[str, Any]]
    segment: dict[str, Any]
    ema: WeightAverage | None
    ema_best: dict[str, Any]

    # -- resume state ---------------------------------------------------------------------------
    @property
    def resume_path(self) -> Path:
        return self.out / RESUME_FILE

    def _config_dict(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json")

    def _start(self, resume: bool) -> bool:
        """Load the resume state when there is one; True when the run was resumed."""
        path = self.resume_path
        if not path.exists():
            if resume and self.dist.is_main:
                print(f"deqguard train: no resume state in {self.out}, starting a new run",
                      file=sys.stderr)
            return False
        if not resume:
            raise DeqguardError(f"{self.out} already holds a run ({path}); pass --resume to "
                                "continue it, or choose another --out")
        state = load_state(path, config=self._config_dict(), data_fingerprint=self.fingerprint,
                           world_size=self.dist.world_size)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ResumeError(f"{path} does not match this model/optimizer: {exc}") from None
        self.model.to(self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.global_step = int(state.get("global_step", 0))
        self.best = dict(state.get("best", self.best))
        self.tally_state = state.get("tally")
        self.history = list(state.get("history", []))
        self.init = state.get("init")
        # a state saved before segments were recorded: what trained it is not known
        self.segments = list(state.get("segments") or (
            [{"start_epoch": 0, "end_epoch": self.epoch, "start_step": 0,
              "end_step": self.global_step, "recorded": False}] if self.global_step else []))
        self._resume_average(state.get("weight_average"), state.get("ema_best"))
        if not self._name_given and state.get("name"):
            self.name = str(state["name"])  # resumed under the name it was started with
        saved_amp = state.get("bf16_autocast")
        if saved_amp is not None and bool(saved_amp) != self.amp and self.dist.is_main:
            # train.amp=auto can resolve differently on another machine (train.device is free)
            print(f"deqguard train: this run was started with bf16 autocast "
                  f"{'on' if saved_amp else 'off'} and continues with it "
                  f"{'on' if self.amp else 'off'}: it will not repeat an uninterrupted run",
                  file=sys.stderr)
        return True

    def _save_resume(self, tally: dict[str, float] | None) -> None:
        """The resume state as of now; `tally`: the epoch's running sums when mid-epoch."""
        if not self.dist.is_main:
            return
        save_state(self.resume_path, {
            "config": self._config_dict(), "data_fingerprint": self.fingerprint,
            "world_size": self.dist.world_size, "epoch": self.epoch, "step": self.step,
            "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "best": self.best, "tally": tally, "history": self.history,
            "init": self.init, "bf16_autocast": self.amp, "name": self.name,
            "segments": self._segments(),
            **({"weight_average": self.ema.state_dict(), "ema_best": self.ema_best}
               if self.ema is not None else {}),
        })

    def _resume_average(self, saved: dict[str, Any] | None, best: dict[str, Any] | None) -> None:
        """Continue the saved weight average, or start one at this step (see weight_average)."""
        if self.ema is None:
            if saved and self.dist.is_main:
                print(f"deqguard train: this run's weight average (decay {saved['decay']}) is "
                      "not continued: train.ema_decay is 0", file=sys.stderr)
            return
        if saved and float(saved["decay"]) == self.ema.decay:
            self.ema.load_state_dict(saved)
            self.ema.to(self.device)
            self.ema_best = dict(best or self.ema_best)
            return
        self.ema.start_step = self.global_step
        if self.dist.is_main:
            why = (f"its decay was {saved['decay']}" if saved else "the run had none")
            print(f"deqguard train: the weight average starts at step {self.global_step} "
                  f"(epoch {self.epoch}): {why}", file=sys.stderr)

    def _new_segment(self) -> dict[str, Any]:
        """This invocation's entry of `segments`, from where it starts; its end is added when
        saved."""
        seg: dict[str, Any] = {
            "start_epoch": self.epoch, "start_step": self.global_step,
            "device": self.device.type, "device_name": device_name(self.device),
            "precision": self.precision.label, "channels_last": self.cfg.train.channels_last,
            "torch_version": str(torch.__version__), "threads": torch.get_num_threads(),
            **invocation(self.argv)}
        if self.device.type == "cuda":  # TF32 rounds convolutions and matmuls to 10 mantissa bits
            seg["tf32"] = tf32_flags()
            seg["cuda_graphs"] = self.cfg.train.cuda_graphs
        return seg

    def _segments(self) -> list[dict[str, Any]]:
        return [*self.segments,
                {**self.segment, "end_epoch": self.epoch, "end_step": self.global_step}]

    # -- checkpoints and the log ----------------------------------------------------------------
    def _save_epoch(self, metrics: dict[str, Any], *, improved: bool, best_epoch: int) -> None:
        """last.safetensors after every epoch; best.safetensors too when this epoch is best."""
        save_checkpoint(self.model, self.out / LAST, self._metadata(metrics))
        if improved:
            save_checkpoint(self.model, self.out / BEST,
                            self._metadata({**metrics, "best_epoch": best_epoch}))

    def _save_average(self, entry: dict[str, Any], *, improved: bool) -> None:
        """ema.safetensors after every epoch; ema_best.safetensors too when the average's own
        validation score is its best so far."""
        if self.ema is None:
            return
        metrics = {"epoch": entry["epoch"], "val_clean_accuracy": entry["val_ema_clean_accuracy"],
                   "val_pgd_accuracy": entry["val_ema_pgd_accuracy"]}
        meta = self._metadata(metrics)
        meta["name"] = f"{self.name}-ema"
        meta["training"]["weight_average"] = self.ema.provenance()
        save_checkpoint(self.ema.model, self.out / EMA_LAST, meta)
        if improved:
            meta["metrics"] = {**metrics, "best_epoch": entry["epoch"]}
            save_checkpoint(self.ema.model, self.out / EMA_BEST, meta)

    def _metadata(self, metrics: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name,
            "classes": self.info.classes,
            "input": {"channels": self.info.in_channels, "height": self.info.image_size,
                      "width": self.info.image_size, "value_range": [0.0, 1.0]},
            "training": {
                "preset": self.preset, "config": c.model_dump(mode="json"),
                **invocation(self.argv),
                "data": {"dataset": c.data.dataset, "fingerprint": self.fingerprint,
                         "train_images": len(self.train_set), "val_images": len(self.val_set)},
                "data_fingerprint": self.fingerprint,
                "epochs_completed": self.epoch, "global_step": self.global_step,
                "world_size": self.dist.world_size, "device": self.device.type,
                "bf16_autocast": self.amp, "precision": self.precision.label,
                "channels_last": c.train.channels_last, "torch_version": torch.__version__,
                "threads": torch.get_num_threads(), "segments": self._segments(),
                **({"init": self.init} if self.init else {}),
            },
            "metrics": metrics,
        }

    def _epoch_metrics(self, entry: dict[str, Any]) -> dict[str, Any]:
        e = self.cfg.eval
        return {"epoch": entry["epoch"], "val_clean_accuracy": entry["val_clean_accuracy"],
                "val_pgd_accuracy": entry["val_pgd_accuracy"],
                "val_pgd": {"eps": e.eps, "steps": e.steps, "step_size": e.step_size,
                            "start": "uniform", "gradient": "model default"},
                "val_images": entry["val_images"],
                "val_mean_iterations": entry["val_mean_iterations"],
                "val_converged_fraction": entry["val_converged_fraction"]}

    def _append_log(self, entry: dict[str, Any]) -> None:
        with (self.out / LOG).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _trim_log(self) -> None:
        """Keep only the log lines of epochs the resume state has completed."""
        path = self.out / LOG
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if "epoch" in row and "event" not in row and row["epoch"] <= self.epoch:
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))
