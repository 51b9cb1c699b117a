"""An exponential moving average of the weights, kept beside a run (`train.ema_decay`).

Why: in adversarial training the averaged weights are more robust than the last ones, and they
cost no training compute (Gowal et al. 2020, "Uncovering the limits of adversarial training":
weight averaging with decay 0.995-0.999 per step; Rebuffi et al. 2021). The average never feeds
back into training: the run's own weights, and so `last` and `best`, are what they would be
without it. So it may be switched on in a run already under way; it then averages from that
step on, and says so (`start_step`): with decay 0.999 the average forgets a step's weights with
a time constant of 1,000 steps, about two epochs of Fashion-MNIST at batch 128.

torch's `AveragedModel` with its EMA update holds and updates the copy; this class adds what a
resumable run needs around it: its state in the resume file and its provenance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..models.classifier import Classifier


class WeightAverage:
    """The EMA copy of `model`; `update` after every optimizer step."""

    def __init__(self, model: Classifier, decay: float, start_step: int):
        self.decay, self.start_step = decay, start_step
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))

    @property
    def model(self) -> Classifier:
        """The averaged weights as a model of the run's own class (checkpoints, validation)."""
        return self.averaged.module  # type: ignore[return-value]

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: Classifier) -> None:
        """Fold in the model's current weights (the first update copies them)."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "start_step": self.start_step,
                "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.start_step = float(state["decay"]), int(state["start_step"])
        self.averaged.load_state_dict(state["averaged"])

    def provenance(self) -> dict[str, Any]:
        """What the averaged checkpoints record about the average (`training.weight_average`)."""
        return {"decay": self.decay, "start_step": self.start_step, "updates": self.updates,
                "update": "ema after every optimizer step (torch AveragedModel)"}

    def to(self, device: torch.device) -> WeightAverage:
        self.averaged.to(device)
        return self
