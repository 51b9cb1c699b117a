"""Standard AutoAttack (Croce & Hein 2020) through the `pyautoattack` package.

`version="standard"` is the published suite: APGD-CE (100 iterations), APGD-T (DLR, 9 targets,
100 iterations each), FAB-T (9 targets) and Square (5000 queries). pyautoattack's wrapper is used
as is, one attack at a time on the still-robust points (what `run_standard_evaluation` does
internally), so that the robust accuracy after each attack is recorded and AA's own warnings
(randomised or dynamic defense, Square beating the white-box attacks) can be collected.
Targets are capped at num_classes - 1 (9 on 10 classes, as published).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def stages_of(outcomes: Mapping[str, Any]) -> list[str]:
    """The attack stages of per-image outcomes keyed "clean", then each stage in run order."""
    return [k for k in outcomes if k != "clean"]


def runs_first(attacks: Sequence[str], stages: Sequence[str]) -> bool:
    """Whether `attacks` run `stages` first, in their order: only then do the stages' earlier
    outcomes stand for what this run would compute."""
    return list(attacks[:len(stages)]) == list(stages)


@dataclass
class AutoAttackResult:
    correct: Tensor  # [N] bool: survived every attack that ran
    x_adv: Tensor
    accuracy_after: dict[str, float]  # cumulative robust accuracy after each attack
    correct_after: dict[str, Tensor]  # [N] bool per stage of accuracy_after: which images
    seconds: dict[str, float]
    attacks: list[str]
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int,
                   seed: int = 0, batch_size: int = 128, version: str = "standard",
                   attacks: list[str] | None = None, device: str | torch.device = "cpu",
                   on_attack: Callable[[str], None] | None = None,
                   done: dict[str, Tensor] | None = None,
                   done_seconds: dict[str, float] | None = None) -> AutoAttackResult:
    """Robust accuracy under AutoAttack on `model` (a logits module, deterministic forward).

    `attacks` restricts the standard suite (same per-attack settings) for quick CPU runs.
    `done` holds the per-image outcomes of the first stages of `attacks` from an earlier run on
    these images ("clean", then each stage in run order; `done_seconds` their times): they are
    taken as they are and only the later stages run, on the images the last one left, which is
    what one run of every stage does (each stage starts from the clean images). An image this
    model now gets wrong clean counts as broken whatever the earlier run said; `x_adv` keeps the
    clean image where an earlier stage broke it (its adversarial image was not kept).
    """
    from pyautoattack import AutoAttack

    chosen = list(STANDARD_ATTACKS) if attacks is None else list(attacks)
    if num_classes < 4:  # the targeted DLR loss needs the 3rd and 4th largest logits
        chosen = [a for a in chosen if a != "apgd-t"]
    aa = AutoAttack(model, device=device, eps=eps, norm="Linf", seed=seed, version=version)
    targets = min(9, num_classes - 1)
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    handler = _Collect()
    aa.logger.addHandler(handler)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                             for i in range(0, len(x), batch_size)])
    x_adv = x.clone()
    after: dict[str, float] = {"clean": correct.float().mean().item()}
    correct_after: dict[str, Tensor] = {"clean": correct.clone()}
    seconds: dict[str, float] = {}
    earlier = stages_of(done or {})
    if not runs_first(chosen, earlier):
        raise ValueError(f"the earlier stages {earlier} do not begin the attacks {chosen}")
    for attack in earlier:
        flags = done[attack].to(correct.device)
        after[attack] = flags.float().mean().item()
        correct_after[attack] = flags.clone()
        if attack in (done_seconds or {}):  # unknown for part of an earlier range
            seconds[attack] = done_seconds[attack]  # type: ignore[index]
    if earlier:
        correct &= correct_after[earlier[-1]]
    try:
        for attack in chosen[len(earlier):]:
            idx = correct.nonzero().flatten()
            t0 = time.perf_counter()
            if idx.numel() > 0:
                aa.attacks_to_run = [attack]
                adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                with torch.no_grad():
                    pred = torch.cat([model(adv[i:i + batch_size]).argmax(1)
                                      for i in range(0, len(adv), batch_size)])
                fooled = pred != y[idx]
                x_adv[idx[fooled]] = adv[fooled]
                correct[idx[fooled]] = False
            seconds[attack] = time.perf_counter() - t0
            after[attack] = correct.float().mean().item()
            correct_after[attack] = correct.clone()
            if on_attack is not None:
                on_attack(attack)
    finally:
        aa.logger.removeHandler(handler)
    return AutoAttackResult(correct=correct, x_adv=x_adv, accuracy_after=after,
                            correct_after=correct_after, seconds=seconds, attacks=chosen,
                            warnings=handler.messages)
