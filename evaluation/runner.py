"""`deqguard eval`: how robust a checkpoint really is, and how well its trajectory detects attacks.

One run produces an `EvalReport` (`schema.py`). The pieces run in this order: clean
accuracy and timing, accuracy against the solver budget, PGD through every gradient path plus
the paper's intermediate-state attacks, adaptive attacks (BPDA through the defense, the
entropy-aware attack on the detector), gradient-masking sweeps, AutoAttack, detection, selective
answers (selective.py: risk-coverage, the calibration the server reads), slowdown attacks
(slowdown_part.py: what an input crafted to stall the solver costs per answer). With the
entropy-reduction defense on, PGD inputs are crafted on the undefended model (transfer, the
paper's protocol) and judged on the defended one; BPDA and AutoAttack attack the defended
forward itself. The headline robust accuracy is the per-sample worst case over all of them.

This module plans and drives the run; the state the parts share is in `state.py`, the parts in
`robustness.py` (clean to worst case) and `detection_part.py` (detection, selective answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from deqguard.models.classifier import Classifier

from . import adaptive_selective, detection_part, rectifier_eval, robustness, slowdown_part
from .schema import CheckpointInfo, EvalReport, EvalSettings
from .state import EvalState


class Evaluation(EvalState):
    """One evaluation run: `plan()` lists the parts `settings.parts` asks for, `run()` runs
    them in order and returns the report."""

    def plan(self) -> list[tuple[str, Callable[[], None]]]:
        parts = set(self.s.parts)
        tasks: list[tuple[str, Callable[[], None]]] = [("clean", self._part(robustness.clean))]
        if "budget" in parts:
            tasks.append(("budget", self._part(robustness.budget)))
        if "pgd" in parts:
            tasks += robustness.pgd_tasks(self)
        if "adaptive" in parts or "detect" in parts:
            tasks += robustness.adaptive_tasks(self)
        if "pgd" in parts or "adaptive" in parts:
            tasks.append(("sweeps", self._part(robustness.sweeps)))
        if "aa" in parts:
            tasks.append(("autoattack", self._part(robustness.autoattack)))
        tasks.append(("worst case", self._part(robustness.combine)))
        if "detect" in parts:
            tasks.append(("detection", self._part(detection_part.detection)))
        if "selective" in parts or (self.s.selective and self.s.selective.calibrate):
            tasks.append(("selective", self._part(detection_part.selective)))
        if "slowdown" in parts:
            tasks.append(("slowdown", self._part(slowdown_part.slowdown)))
        if "adaptive-selective" in parts:
            tasks.append(("adaptive-selective", self._part(adaptive_selective.part)))
        if "rectifier-aware" in parts:
            tasks.append(("rectifier-aware", self._part(rectifier_eval.part)))
        return tasks

    def _part(self, part: Callable[[EvalState], None]) -> Callable[[], None]:
        return lambda: part(self)

    def run(self) -> EvalReport:
        from tqdm import tqdm

        t0 = time.perf_counter()
        tasks = self.plan()
        with tqdm(total=len(tasks), desc="eval", disable=not self.progress, unit="task") as bar:
            for label, fn in tasks:
                bar.set_postfix_str(label)
                fn()
                bar.update(1)
        self.report.seconds_total = time.perf_counter() - t0
        return self.report


def evaluate(model: Classifier, x: Tensor, y: Tensor, settings: EvalSettings, *,
             checkpoint: CheckpointInfo, x_val: Tensor | None = None,
             y_val: Tensor | None = None, progress: bool = True,
             learned_detector: Any = None, aa_earlier: Any = None) -> EvalReport:
    """Run every part of `settings.parts` on (x, y) and return the report.

    `learned_detector` (the checkpoint's LogisticDetector) adds its score, "learned_detector",
    to the detect part next to the trajectory scores and baselines (undefended DEQs only), and
    the "detector" doubt score and the detector-aware attack to the selective part.
    `aa_earlier` (aa_from.EarlierStages) holds AutoAttack stages an earlier report ran on these
    images: the aa part takes them as they are and runs the rest.
    """
    ev = Evaluation(model, x, y, settings, checkpoint=checkpoint, x_val=x_val, y_val=y_val,
                    progress=progress)
    ev.learned_detector = learned_detector
    ev.aa_earlier = aa_earlier
    return ev.run()
