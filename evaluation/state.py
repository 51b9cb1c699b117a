"""What one evaluation run shares between its parts: the model, the data, the predictors.

The parts (`robustness.py`, `detection_part.py`) read and extend this state in the order
`runner.py` plans; they share the attacked inputs (detection scores them again) and the
per-sample correctness (the worst case combines it), so each attack runs once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor

from deqguard.models.classifier import Classifier, SolveResult
from deqguard.models.defense import EntropyReductionConfig, entropy_reduction_solve

from .attacks import AttackSpec, default_step_size, run_attack
from .schema import AttackResult, CheckpointInfo, EvalReport, EvalSettings


class EvalState:
    """State of one evaluation run: settings, data on the device, predictors, results so far."""

    def __init__(self, model: Classifier, x: Tensor, y: Tensor, settings: EvalSettings, *,
                 checkpoint: CheckpointInfo, x_val: Tensor | None = None,
                 y_val: Tensor | None = None, progress: bool = True):
        self.model, self.s, self.ckpt = model.eval(), settings, checkpoint
        dev = torch.device(settings.device)
        self.x, self.y = x.to(dev), y.to(dev)
        self.x_val = None if x_val is None else x_val.to(dev)
        self.y_val = None if y_val is None else y_val.to(dev)
        self.progress = progress
        self.defended = settings.defense == "entropy-reduction"
        if self.defended and not model.is_deq:
            raise ValueError("the entropy-reduction defense needs a DEQ checkpoint")
        self.defense_cfg = ((settings.defense_config or EntropyReductionConfig()).resolved(model)
                            if self.defended else None)
        self.report = EvalReport(deqguard_version=_version(), created=_now(), seconds_total=0.0,
                                 checkpoint=checkpoint, settings=settings)
        self.correct: dict[str, Tensor] = {}  # attack -> correct on the evaluated predictor
        self.x_adv: dict[str, Tensor] = {}
        self.specs: dict[str, AttackSpec] = {}
        self.clean_main: SolveResult | None = None
        self.clean_correct: Tensor | None = None  # set by the clean part
        self.aa_correct: Tensor | None = None  # set by the AutoAttack part, with aa_x_adv
        self.aa_x_adv: Tensor | None = None
        self.aa_earlier: Any = None  # aa_from.EarlierStages the AutoAttack part continues
        self._seed = settings.seed
        self.learned_detector: Any = None  # LogisticDetector from the checkpoint, if any

    # -- predictors ------------------------------------------------------------------------------
    def solve_undefended(self, x: Tensor) -> SolveResult:
        return self.model.solve(x)

    def solve_main(self, x: Tensor) -> SolveResult:
        if self.defended:
            return entropy_reduction_solve(self.model, x, self.defense_cfg)
        return self.model.solve(x)

    def predict_main(self, x: Tensor) -> Tensor:
        return self._predict(self.solve_main, x)

    def predict_undefended(self, x: Tensor) -> Tensor:
        return self._predict(self.solve_undefended, x)

    def _predict(self, solve: Callable[[Tensor], SolveResult], x: Tensor) -> Tensor:
        bs = self.s.batch_size
        with torch.no_grad():
            return torch.cat([solve(x[i:i + bs]).logits.argmax(1) for i in range(0, len(x), bs)])

    def generator(self) -> torch.Generator:
        """A fresh seeded generator per attack: each attack's random starts are reproducible."""
        self._seed += 1
        return torch.Generator(device=self.x.device).manual_seed(self._seed)

    # -- attacks ---------------------------------------------------------------------------------
    def spec(self, name: str, kind: str, *, eps: float | None = None, steps: int | None = None,
             **kw) -> AttackSpec:
        eps = self.s.eps if eps is None else eps
        steps = self.s.pgd_steps if steps is None else steps
        step_size = self.s.step_size if self.s.step_size is not None else default_step_size(
            eps, steps)
        if self.s.step_size is not None and steps != self.s.pgd_steps:
            step_size = self.s.step_size * self.s.pgd_steps / steps
        return AttackSpec(name=name, kind=kind, eps=eps, steps=steps, step_size=step_size,
                          restarts=self.s.pgd_restarts, **kw)

    def attack(self, spec: AttackSpec, *, transfer: bool, record: bool = True,
               n: int | None = None) -> tuple[Tensor, Tensor]:
        """Craft on the undefended model (transfer) or the evaluated predictor; judge on both.

        `n` limits an unrecorded attack to the first n samples (the sweeps' `sweep_n`).
        """
        t0 = time.perf_counter()
        predict = self.predict_undefended if transfer else self.predict_main
        x, y = (self.x, self.y) if n is None or record else (self.x[:n], self.y[:n])
        x_adv, ok = run_attack(self.model, spec, x, y, predict,
                               defense=self.defense_cfg, batch_size=self.s.batch_size,
                               generator=self.generator())
        if self.defended and transfer:
            undef_ok, ok = ok, self.predict_main(x_adv) == y
        elif self.defended:
            undef_ok = self.predict_undefended(x_adv) == y
        else:
            undef_ok = ok
        if record:
            threat = ("transfer" if self.defended and transfer else
                      "adaptive" if spec.kind in ("bpda", "detector") else "white-box")
            self.report.attacks.append(AttackResult(
                name=spec.name, spec=spec.describe(), threat=threat, accuracy=mean(ok),
                accuracy_undefended=mean(undef_ok), n=len(ok),
                seconds=time.perf_counter() - t0))
            self.correct[spec.name] = ok
            self.x_adv[spec.name] = x_adv
            self.specs[spec.name] = spec
        return x_adv, ok

    def primary_spec(self, *, eps: float | None = None, steps: int | None = None,
                     gradient: str | None = None) -> AttackSpec:
        """The attack the sweeps and the logistic detector use.

        On an undefended DEQ it goes through `gradient`, by default the checkpoint's training path
        (cheap, and the one the detector calibration is matched against).
        """
        k = self.s.pgd_steps if steps is None else steps
        if self.defended:
            path = (self.s.bpda_paths or ["exact"])[0]
            return self.spec(f"bpda-pgd{k}-{path}", "bpda", gradient=path, eps=eps, steps=k)
        path = (gradient or self.model.config.grad.mode) if self.model.is_deq else "direct"
        return self.spec(f"pgd{k}-{path}", "pgd", gradient=path, eps=eps, steps=k)

    def warn(self, msg: str) -> None:
        if msg not in self.report.warnings:
            self.report.warnings.append(msg)


def slack(n: int) -> float:
    """Tolerance for 'should not increase' checks: one sample, at least one point."""
    return max(0.01, 1.0 / max(n, 1))


def mean(t: Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")


def monotone(values: list[float], tolerance: float) -> bool:
    return all(b <= a + tolerance for a, b in zip(values, values[1:], strict=False))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    from deqguard import __version__

    return __version__
