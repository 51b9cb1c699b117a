"""One training run: data, model, objective, epochs, validation, checkpoints, resumption.

Output folder (`--out`, default runs/<preset>; its name is the checkpoints' default name):
    last.safetensors   weights + metadata after every epoch (deqguard checkpoint, atomic)
    best.safetensors   the epoch with the best validation robust (PGD) accuracy
    train_log.jsonl    one JSON line per epoch, then one {"event": "final"} line
    resume.pt          optimizer/scheduler/position, every `save_every_steps` steps and per epoch

Determinism: every random draw of step s of epoch e (batch order, per-sample augmentation,
dropout masks, attack start noise, regulated solver depth, Jacobian-term coin and probes) comes
from generators seeded by (seed, e, s, rank), so a run resumed at any step repeats an
uninterrupted run exactly on CPU (and up to non-deterministic kernels on GPU).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..models import build_model, save_checkpoint, update_metadata
from ..models.classifier import Classifier
from ..models.errors import DeqguardError
from ..models.registry import resolve_config
from . import distributed
from .batches import ResidentBatches
from .config import SINGLE_STEP_KINDS, TrainConfig, deep_merge, resolve
from .data import (
    DataError,
    DatasetInfo,
    augmentation_for,
    data_fingerprint,
    dataset_info,
    load_dataset,
    resident_tensors,
)
from .objectives import TrainForward, objective_loss
from .overfit_guard import catastrophic_overfitting
from .precision import choose_precision
from .resume import RESUME_FILE, load_state, save_state
from .validation import clean_accuracy, validate
from .warm_start import warm_start

LAST, BEST, LOG = "last.safetensors", "best.safetensors", "train_log.jsonl"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", epoch, step, rank)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little")
             for p in parts]
    state = np.random.SeedSequence([w & 0xFFFFFFFF for w in words] + [w >> 32 for w in words])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed) for one epoch, from batch `start` on.

    Global batch b is positions [b*B*W, (b+1)*B*W) of a permutation seeded by (seed, epoch);
    process r takes its B-slice of it. The last incomplete batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.b, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world_size
        self.steps = n // (batch_size * world_size)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx, aug in self.index_tensors():
            yield list(zip(idx.tolist(), aug.tolist(), strict=True))

    def index_tensors(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The same batches as (indices [B], augmentation seeds [B]) tensors."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.n, generator=g)
        aug = torch.randint(0, 2**62, (self.n,), generator=g)
        gb = self.b * self.world
        for step in range(self.start, self.steps):
            lo = step * gb + self.rank * self.b
            yield perm[lo:lo + self.b], aug[lo:lo + self.b]


@dataclass
class RunResult:
    out_dir: Path
    last: Path
    best: Path
    metrics: dict[str, Any]
    is_main: bool = True  # the process that wrote the checkpoints (rank 0 under torchrun)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeqguardError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def model_config_for(cfg: TrainConfig, info: DatasetInfo):
    """The preset's model config with the dataset's shape and the overrides deep-merged."""
    base = resolve_config(cfg.model.preset)
    shape = {"num_classes": info.num_classes, "in_channels": info.in_channels,
             "image_size": info.image_size}
    data = deep_merge(base.model_dump(), {**shape, **cfg.model.overrides})
    try:
        return type(base).model_validate(data)
    except ValueError as exc:
        raise DeqguardError(f"invalid model overrides {cfg.model.overrides}: {exc}") from None


class _Tally:
    """Running sums of one epoch; survives a resume through the resume state."""

    KEYS = ("loss", "images", "clean_correct", "clean_n", "adv_correct", "adv_n", "iters",
            "iters_n", "depth", "depth_n", "jac", "jac_n", "seconds", "steps")

    def __init__(self, saved: dict[str, float] | None = None):
        self.v = {k: 0.0 for k in self.KEYS}
        if saved:
            self.v.update({k: float(saved[k]) for k in self.KEYS if k in saved})

    def add(self, **kw: float) -> None:
        for k, val in kw.items():
            self.v[k] += float(val)

    def ratio(self, a: str, b: str) -> float | None:
        return self.v[a] / self.v[b] if self.v[b] else None


class Trainer:
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
        self.optimizer = self._optimizer()
        total = self.cfg.train.epochs * self.steps_per_epoch
        if self.cfg.optim.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=total, eta_min=self.cfg.optim.min_lr)
        elif self.cfg.optim.schedule == "one-cycle":
            # Wong et al.'s cyclic schedule for short runs: linear up from lr / 25 to lr, then
            # linearly down to min_lr (OneCycleLR's end is its start divided by final_div_factor).
            o, rise = self.cfg.optim, 25.0
            start = o.lr / rise
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=o.lr, total_steps=total + 1,
                pct_start=o.warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
                div_factor=rise, final_div_factor=max(start / max(o.min_lr, 1e-12), 1.0))
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best = {"value": -math.inf, "epoch": None}
        self.tally_state: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.init: dict[str, Any] | None = None
        if not self._start(resume) and cfg.train.init_from:
            # a resumed run has its weights and its parent's provenance in the resume state
            self.init = warm_start(self.model, model_cfg, cfg.train.init_from)
        distributed.broadcast_parameters(self.model)

    # -- setup ------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = self.model.parameters()
        if o.name == "adam":
            return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)

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
            from .resume import ResumeError
            raise ResumeError(f"{path} does not match this model/optimizer: {exc}") from None
        self.model.to(self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.global_step = int(state.get("global_step", 0))
        self.best = dict(state.get("best", self.best))
        self.tally_state = state.get("tally")
        self.history = list(state.get("history", []))
        self.init = state.get("init")
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

    def _save_resume(self, tally: _Tally | None) -> None:
        if not self.dist.is_main:
            return
        save_state(self.resume_path, {
            "config": self._config_dict(), "data_fingerprint": self.fingerprint,
            "world_size": self.dist.world_size, "epoch": self.epoch, "step": self.step,
            "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "best": self.best, "tally": tally.v if tally else None, "history": self.history,
            "init": self.init, "bf16_autocast": self.amp, "name": self.name,
        })

    # -- one step -------------------------------------------------------------------------------
    def _forward(self, depth_gen: torch.Generator) -> TrainForward:
        s = self.cfg.solver
        return TrainForward(self.model, solver=s.solver, max_iter=s.max_iter, tol=s.tol,
                            grad=self.cfg.grad, readout=self.cfg.objective.readout,
                            random_depth=self.cfg.regulation.enabled, generator=depth_gen)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, tally: _Tally) -> float:
        cfg, rank = self.cfg, self.dist.rank
        key = (cfg.train.seed, self.epoch, self.step, rank)
        torch.manual_seed(derive_seed(*key, "dropout"))
        depth_gen = torch.Generator().manual_seed(derive_seed(*key, "depth"))
        noise_gen = torch.Generator(device=self.device).manual_seed(derive_seed(*key, "noise"))
        coin = torch.Generator().manual_seed(derive_seed(*key, "jacobian"))
        j = cfg.jacobian
        use_jac = (self.model.is_deq and j.weight > 0 and self.epoch < j.stop_epoch
                   and float(torch.rand((), generator=coin)) < j.freq)
        if self.cfg.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fwd = self._forward(depth_gen)
        self.model.train()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            out = objective_loss(cfg.objective, fwd, x, y, noise=noise_gen,
                                 clean_only=self.global_step < cfg.objective.clean_warmup_steps,
                                 jacobian_vectors=j.vectors if use_jac else 0,
                                 jacobian_weight=j.weight)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        distributed.average_gradients(self.model)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise DeqguardError(f"the loss became {loss} at epoch {self.epoch} step {self.step}; "
                                "lower optim.lr or enable jacobian regularisation")
        n = len(y)
        tally.add(loss=loss * n, images=n, steps=1)
        if out.clean_logits is not None:
            tally.add(clean_correct=(out.clean_logits.argmax(1) == y).sum(), clean_n=n)
        if out.adv_logits is not None:
            tally.add(adv_correct=(out.adv_logits.argmax(1) == y).sum(), adv_n=n)
        if fwd.iterations:
            tally.add(iters=sum(fwd.iterations), iters_n=len(fwd.iterations))
        if fwd.depths and cfg.regulation.enabled:
            tally.add(depth=sum(fwd.depths), depth_n=len(fwd.depths))
        if out.jacobian is not None:
            tally.add(jac=float(out.jacobian), jac_n=1)
        return loss

    # -- epochs ---------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, sampler=None, batch_size: int | None = None) -> DataLoader:
        kw: dict[str, Any] = {"num_workers": self.cfg.train.num_workers,
                              "pin_memory": self.device.type == "cuda"}
        if sampler is not None:
            return DataLoader(dataset, batch_sampler=sampler, **kw)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)

    def _resident_batches(self) -> ResidentBatches | None:
        """The training split on the device when the config and the dataset allow it."""
        d = self.cfg.data
        if d.pipeline == "loader":
            return None
        arrays = resident_tensors(self.train_set)
        if arrays is None:
            if d.pipeline == "resident":
                raise DeqguardError(f"data.pipeline=resident needs an in-memory dataset "
                                    f"(fashion-mnist, cifar10), not {d.dataset}")
            return None
        augment = augmentation_for(d.dataset) if d.augment else None
        return ResidentBatches(*arrays, augment, self.device)

    def _train_batches(self, sampler: EpochBatches) -> Iterator[tuple[Tensor, Tensor]]:
        if self.resident is not None:
            return self.resident.epoch(sampler.index_tensors())
        return iter(self._loader(self.train_set, sampler))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """This process's share of an evaluation set (every W-th image)."""
        if self.dist.enabled:
            from torch.utils.data import Subset
            dataset = Subset(dataset, range(self.dist.rank, len(dataset), self.dist.world_size))
        return self._loader(dataset, batch_size=self.cfg.eval.batch_size)

    def run_epoch(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        tally = _Tally(self.tally_state if self.step > 0 else None)
        self.tally_state = None
        sampler = EpochBatches(len(self.train_set), cfg.train.batch_size, seed=cfg.train.seed,
                               epoch=self.epoch, start=self.step, rank=self.dist.rank,
                               world_size=self.dist.world_size)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step, unit="batch",
                   desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True,
                   disable=not (cfg.train.progress and self.dist.is_main))
        t0 = time.perf_counter() - tally.v["seconds"]
        for x, y in self._train_batches(sampler):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.train_step(x, y, tally)
            self.step += 1
            self.global_step += 1
            tally.v["seconds"] = time.perf_counter() - t0
            acc = tally.ratio("adv_correct", "adv_n") or tally.ratio("clean_correct", "clean_n")
            rate = tally.v["images"] * self.dist.world_size / max(tally.v["seconds"], 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc or 0:.3f}", img_s=f"{rate:.0f}")
            bar.update(1)
            if self.step % cfg.train.save_every_steps == 0 and self.step < self.steps_per_epoch:
                self._save_resume(tally)
        bar.close()
        train_seconds = tally.v["seconds"]
        v0 = time.perf_counter()
        e = cfg.eval
        val = validate(self.model, self._eval_loader(self.val_set), eps=e.eps,
                       step_size=e.step_size, steps=e.steps, device=self.device, autocast=self.amp,
                       generator=torch.Generator(device=self.device).manual_seed(
                           derive_seed(cfg.train.seed, "val", self.epoch, self.dist.rank)),
                       progress=self._progress(f"validation {self.epoch + 1}/{cfg.train.epochs}"))
        entry = {
            "epoch": self.epoch + 1, "global_step": self.global_step,
            "train_loss": tally.ratio("loss", "images"),
            "train_clean_accuracy": tally.ratio("clean_correct", "clean_n"),
            "train_adv_accuracy": tally.ratio("adv_correct", "adv_n"),
            "train_mean_iterations": tally.ratio("iters", "iters_n"),
            "train_mean_depth": tally.ratio("depth", "depth_n"),
            "train_jacobian": tally.ratio("jac", "jac_n"),
            "val_clean_accuracy": val["clean_accuracy"], "val_pgd_accuracy": val["pgd_accuracy"],
            "val_mean_iterations": val["mean_iterations"],
            "val_converged_fraction": val["converged_fraction"], "val_images": val["images"],
            "lr": self.scheduler.get_last_lr()[0],
            "train_seconds": round(train_seconds, 3),
            "val_seconds": round(time.perf_counter() - v0, 3),
            "images_per_second": round(tally.v["images"] * self.dist.world_size
                                       / max(train_seconds, 1e-9), 2),
        }
        return entry

    def _progress(self, label: str) -> str | None:
        """The progress bar label where bars are on (main process, train.progress), else None."""
        return label if self.cfg.train.progress and self.dist.is_main else None

    def _metadata(self, metrics: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name,
            "classes": self.info.classes,
            "input": {"channels": self.info.in_channels, "height": self.info.image_size,
                      "width": self.info.image_size, "value_range": [0.0, 1.0]},
            "training": {
                "preset": self.preset, "config": c.model_dump(mode="json"),
                "command": shlex.join(self.argv), "argv": self.argv,
                "data": {"dataset": c.data.dataset, "fingerprint": self.fingerprint,
                         "train_images": len(self.train_set), "val_images": len(self.val_set)},
                "data_fingerprint": self.fingerprint,
                "epochs_completed": self.epoch, "global_step": self.global_step,
                "world_size": self.dist.world_size, "device": self.device.type,
                "bf16_autocast": self.amp, "precision": self.precision.label,
                "channels_last": c.train.channels_last, "torch_version": torch.__version__,
                "threads": torch.get_num_threads(),
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

    def run(self) -> RunResult:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_log()
        while self.epoch < cfg.train.epochs:
            entry = self.run_epoch()
            metrics = self._epoch_metrics(entry)
            score = entry["val_pgd_accuracy"] if cfg.eval.select_by == "pgd" else \
                entry["val_clean_accuracy"]
            improved = score > self.best["value"]
            if improved:
                self.best = {"value": score, "epoch": entry["epoch"]}
            self.epoch += 1
            self.step = 0
            self.history.append(entry)
            if self.dist.is_main:
                save_checkpoint(self.model, self.out / LAST, self._metadata(metrics))
                if improved:
                    save_checkpoint(self.model, self.out / BEST,
                                    self._metadata({**metrics, "best_epoch": entry["epoch"]}))
                self._append_log(entry)
                print(json.dumps(entry), file=sys.stderr)
            self._save_resume(None)
            distributed.barrier()
            if self._overfitted():
                break
        final = self._finish()
        return RunResult(self.out, self.out / LAST, self.out / BEST, final, self.dist.is_main)

    def _overfitted(self) -> bool:
        """The guard: on catastrophic overfitting, restore the best epoch's weights and stop."""
        cfg = self.cfg
        if not cfg.train.overfit_guard or cfg.objective.kind not in SINGLE_STEP_KINDS:
            return False
        why = catastrophic_overfitting(self.history, cfg.train.overfit_drop)
        if why is None:
            return False
        from ..models import load_checkpoint

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
        from ..models import load_checkpoint

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
        for name in (LAST, BEST):
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
