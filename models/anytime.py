"""Anytime inference: stop a sample's solve once its prediction has settled.

The paper's observation is that clean inputs settle within a few iterations while attacked ones
keep moving, so a fixed `max_iter` spends most of its budget on inputs that no longer change.
`SettleRule` stops a sample at step t when the top-1 class of its decoded iterates has been the
same for the last `k` iterates (z_{t-k+1} .. z_t) and the entropy of z_t's prediction is under
`entropy` nats. The defaults serving uses were measured on Fashion-MNIST (bench/anytime.py).

`IterateWatcher` is the solver hook pair that implements it: `on_iterate` decodes each iterate
once (for the entropy and prediction trajectories and the rule), `stop_when` answers the solver's
per-sample question. The solver freezes stopped samples, so the rule never changes another
sample's answer. Without a rule nothing needs an iterate's prediction during the solve, so with
`deferred=True` the watcher only keeps the iterates and decodes them all in one batch at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .entropy import prediction_entropy


@dataclass(frozen=True)
class SettleRule:
    """Top-1 unchanged over the last `k` iterates and entropy below `entropy` (nats)."""

    k: int
    entropy: float

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"settle k must be at least 1, got {self.k}")
        if not self.entropy > 0:
            raise ValueError(f"settle entropy threshold must be positive, got {self.entropy}")


class IterateWatcher:
    """Decodes every iterate once; records its entropy and applies an optional SettleRule."""

    def __init__(self, decode: Callable[[Tensor], Tensor], settle: SettleRule | None,
                 record: bool, deferred: bool = False):
        self.decode = decode
        self.settle = settle
        self.record = record
        self.deferred = deferred and settle is None
        self.entropies: list[Tensor] = []
        self.predictions: list[Tensor] = []
        self._top1: Tensor | None = None
        self._run: Tensor | None = None  # iterates in a row with the same top-1
        self._settled: Tensor | None = None
        # deferred decoding: each step's iterate and the samples that were still iterating
        self._iterates: list[tuple[Tensor, Tensor]] = []
        self._decoded: tuple[Tensor, Tensor] | None = None

    def on_iterate(self, _t: int, z_t: Tensor, active: Tensor) -> None:
        if self.deferred:
            if self.record:
                # the solver rebuilds its mask every step (never in place): no copy needed
                self._iterates.append((z_t.detach(), active))
            return
        with torch.no_grad():
            logits = self.decode(z_t.detach())
            ent = prediction_entropy(logits)
            top1 = logits.argmax(dim=-1)
            if self.record:
                self.entropies.append(ent)
                self.predictions.append(top1)
            if self.settle is None:
                return
            if self._top1 is None or self._run is None:
                self._run = torch.ones_like(top1)
            else:
                self._run = torch.where(top1 == self._top1, self._run + 1, 1)
            self._top1 = top1
            self._settled = (self._run >= self.settle.k) & (ent < self.settle.entropy)

    def stop_when(self, _t: int, _z_t: Tensor, active: Tensor) -> Tensor:
        if self._settled is None:
            return torch.zeros_like(active)
        return self._settled

    def _decode_all(self) -> tuple[Tensor, Tensor]:
        """[T, B] entropy and top-1 of every step's iterate, from one decode of the iterates
        samples reached while iterating; a stopped sample's frozen iterate repeats its last
        row, as the per-step decoding gave it."""
        if self._decoded is None:
            masks = torch.stack([a for _, a in self._iterates])  # [T, B]
            with torch.no_grad():
                # one mask over the stacked iterates: the same rows in the same (t, b) order
                # as a mask per step, in two ops instead of one per step
                rows = torch.stack([z for z, _ in self._iterates])[masks]
                logits = self.decode(rows)
                ent, top1 = prediction_entropy(logits), logits.argmax(dim=-1)
                # row of the concatenation holding (t, b) where b was active, else -1; the
                # running max then points every later step at the sample's last own row
                pos = masks.flatten().cumsum(0).view_as(masks) - 1
                pos = torch.where(masks, pos, -1).cummax(dim=0).values
            self._decoded = ent[pos], top1[pos]
        return self._decoded

    @property
    def entropy(self) -> Tensor | None:
        if self.deferred:
            return self._decode_all()[0] if self.record and self._iterates else None
        return torch.stack(self.entropies) if self.record and self.entropies else None

    @property
    def prediction(self) -> Tensor | None:
        """[T, B] top-1 class of each iterate (detection's early-vs-final disagreement)."""
        if self.deferred:
            return self._decode_all()[1] if self.record and self._iterates else None
        return torch.stack(self.predictions) if self.record and self.predictions else None
