"""One training epoch: its batches, each optimizer step, and the validation that closes it.

`EpochLoop` is a part of `Trainer` (deqguard.training.loop), kept in its own file because the
step is where the determinism and the numbers of the epoch's log line come from; the attributes
it reads are set up by `Trainer.__init__`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..models.classifier import Classifier
from ..models.errors import DeqguardError
from . import distributed
from .batches import ResidentBatches
from .config import TrainConfig
from .data import augmentation_for, resident_tensors
from .graphs import DepthGraphs
from .objectives import LossOutput, TrainForward, objective_loss
from .seeds import EpochBatches, derive_seed
from .validation import validate
from .weight_average import WeightAverage


class _Tally:
    """Running sums of one epoch; survives a resume through the resume state."""

    KEYS = ("loss", "images", "clean_correct", "clean_n", "adv_correct", "adv_n", "iters",
            "iters_n", "depth", "depth_n", "jac", "jac_n", "rr", "rr_n", "seconds", "steps")

    def __init__(self, saved: dict[str, float] | None = None):
        self.v = {k: 0.0 for k in self.KEYS}
        if saved:
            self.v.update({k: float(saved[k]) for k in self.KEYS if k in saved})

    def add(self, **kw: float) -> None:
        for k, val in kw.items():
            self.v[k] += float(val)

    def ratio(self, a: str, b: str) -> float | None:
        return self.v[a] / self.v[b] if self.v[b] else None


def _read_step_numbers(out: LossOutput, y: Tensor, iterations: list[Tensor]) -> dict[str, Any]:
    """The step's logged numbers, read from the device in one transfer instead of one each.

    float64 holds every float32 value and every count exactly, so the numbers are those that
    reading each tensor on its own gives. `iters`: one mean per forward, in call order.
    """
    parts: dict[str, Tensor] = {"loss": out.loss.detach().reshape(1)}
    if out.clean_logits is not None:
        parts["clean_correct"] = (out.clean_logits.argmax(1) == y).sum().reshape(1)
    if out.adv_logits is not None:
        parts["adv_correct"] = (out.adv_logits.argmax(1) == y).sum().reshape(1)
    if out.jacobian is not None:
        parts["jac"] = out.jacobian.detach().reshape(1)
    if out.rectifier is not None:
        parts["rr"] = out.rectifier.detach().reshape(1)
    if iterations:
        parts["iters"] = torch.stack(iterations)
    values = torch.cat([t.to(torch.float64) for t in parts.values()]).tolist()
    read: dict[str, Any] = {}
    for key, t in parts.items():
        k = t.numel()
        read[key], values = (values[:k] if key == "iters" else values[0]), values[k:]
    return read


class EpochLoop:
    """Training steps and the epoch around them (a part of `Trainer`, whose `_save_resume`
    writes the resume state mid-epoch every `train.save_every_steps` steps)."""

    cfg: TrainConfig
    model: Classifier
    device: torch.device
    dist: distributed.DistInfo
    amp: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: Dataset
    val_set: Dataset
    resident: ResidentBatches | None
    graphs: DepthGraphs | None
    ema: WeightAverage | None
    steps_per_epoch: int
    epoch: int
    step: int
    global_step: int
    tally_state: dict[str, float] | None

    # -- one step -------------------------------------------------------------------------------
    def _forward(self, depth_gen: torch.Generator) -> TrainForward:
        s = self.cfg.solver
        return TrainForward(self.model, solver=s.solver, max_iter=s.max_iter, tol=s.tol,
                            grad=self.cfg.grad, readout=self.cfg.objective.readout,
                            random_depth=self.cfg.regulation.enabled, generator=depth_gen,
                            graphs=self.graphs)

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
        # captured graphs need autocast's weight-cast cache off (torch.cuda.graphs)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp,
                            cache_enabled=self.graphs is None):
            out = objective_loss(cfg.objective, fwd, x, y, noise=noise_gen,
                                 clean_only=self.global_step < cfg.objective.clean_warmup_steps,
                                 jacobian_vectors=j.vectors if use_jac else 0,
                                 jacobian_weight=j.weight,
                                 rectifier_weight=cfg.rectifier.weight)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        distributed.average_gradients(self.model)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        logged = _read_step_numbers(out, y, fwd.iterations)
        loss = logged["loss"]
        if not math.isfinite(loss):
            raise DeqguardError(f"the loss became {loss} at epoch {self.epoch} step {self.step}; "
                                "lower optim.lr or enable jacobian regularisation")
        n = len(y)
        tally.add(loss=loss * n, images=n, steps=1)
        if "clean_correct" in logged:
            tally.add(clean_correct=logged["clean_correct"], clean_n=n)
        if "adv_correct" in logged:
            tally.add(adv_correct=logged["adv_correct"], adv_n=n)
        if fwd.iterations:
            tally.add(iters=sum(logged["iters"]), iters_n=len(fwd.iterations))
        if fwd.depths and cfg.regulation.enabled:
            tally.add(depth=sum(fwd.depths), depth_n=len(fwd.depths))
        if "jac" in logged:
            tally.add(jac=logged["jac"], jac_n=1)
        if "rr" in logged:
            tally.add(rr=logged["rr"], rr_n=1)
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
                self._save_resume(tally.v)
        bar.close()
        train_seconds = tally.v["seconds"]
        v0 = time.perf_counter()
        val = self._validate(self.model, f"validation {self.epoch + 1}/{cfg.train.epochs}")
        entry = {
            "epoch": self.epoch + 1, "global_step": self.global_step,
            "train_loss": tally.ratio("loss", "images"),
            "train_clean_accuracy": tally.ratio("clean_correct", "clean_n"),
            "train_adv_accuracy": tally.ratio("adv_correct", "adv_n"),
            "train_mean_iterations": tally.ratio("iters", "iters_n"),
            "train_mean_depth": tally.ratio("depth", "depth_n"),
            "train_jacobian": tally.ratio("jac", "jac_n"),
            "train_rectifier_bce": tally.ratio("rr", "rr_n"),
            "val_clean_accuracy": val["clean_accuracy"], "val_pgd_accuracy": val["pgd_accuracy"],
            "val_mean_iterations": val["mean_iterations"],
            "val_converged_fraction": val["converged_fraction"], "val_images": val["images"],
            "lr": self.scheduler.get_last_lr()[0],
            "train_seconds": round(train_seconds, 3),
            "val_seconds": round(time.perf_counter() - v0, 3),
            "images_per_second": round(tally.v["images"] * self.dist.world_size
                                       / max(train_seconds, 1e-9), 2),
        }
        if self.ema is not None:  # the same attack draws as the run's own validation
            v0 = time.perf_counter()
            ema = self._validate(self.ema.model, f"validation (ema) {self.epoch + 1}")
            entry["val_ema_clean_accuracy"] = ema["clean_accuracy"]
            entry["val_ema_pgd_accuracy"] = ema["pgd_accuracy"]
            entry["val_ema_seconds"] = round(time.perf_counter() - v0, 3)
            entry["ema_updates"] = self.ema.updates
        return entry

    def _validate(self, model: Classifier, label: str) -> dict[str, Any]:
        e = self.cfg.eval
        # fp32 whatever the steps ran in (on an H200, bf16 validation ran every solve to its cap)
        return validate(model, self._eval_loader(self.val_set), eps=e.eps,
                        step_size=e.step_size, steps=e.steps, device=self.device,
                        generator=torch.Generator(device=self.device).manual_seed(
                            derive_seed(self.cfg.train.seed, "val", self.epoch, self.dist.rank)),
                        progress=self._progress(label))

    def _progress(self, label: str) -> str | None:
        """The progress bar label where bars are on (main process, train.progress), else None."""
        return label if self.cfg.train.progress and self.dist.is_main else None
