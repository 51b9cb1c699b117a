"""What a run is built from before its first step: device, model config, optimizer, schedule.

Pure functions of the config, kept apart from the run's state so that each reads as the recipe
it implements (the one-cycle schedule in particular) rather than as lines of a constructor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..models.config import ModelConfig
from ..models.device import resolve_device
from ..models.errors import DeqguardError
from ..models.registry import resolve_config
from .config import OptimConfig, TrainConfig, deep_merge
from .data import DatasetInfo


def pick_device(name: str) -> torch.device:
    return torch.device(resolve_device(name))


def model_config_for(cfg: TrainConfig, info: DatasetInfo) -> ModelConfig:
    """The preset's model config with the dataset's shape and the overrides deep-merged."""
    base = resolve_config(cfg.model.preset)
    shape = {"num_classes": info.num_classes, "in_channels": info.in_channels,
             "image_size": info.image_size}
    data = deep_merge(base.model_dump(), {**shape, **cfg.model.overrides})
    try:
        return type(base).model_validate(data)
    except ValueError as exc:
        raise DeqguardError(f"invalid model overrides {cfg.model.overrides}: {exc}") from None


def make_optimizer(params: Iterable[torch.nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig,
                   total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over `total` steps, stepped once per training step."""
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total,
                                                          eta_min=o.min_lr)
    if o.schedule == "one-cycle":
        # Wong et al.'s cyclic schedule for short runs: linear up from lr / 25 to lr, then
        # linearly down to min_lr (OneCycleLR's end is its start divided by final_div_factor).
        rise = 25.0
        start = o.lr / rise
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=o.lr, total_steps=total + 1,
            pct_start=o.warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
            div_factor=rise, final_div_factor=max(start / max(o.min_lr, 1e-12), 1.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
