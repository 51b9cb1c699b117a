"""Selective answers in the service: a request's coverage -> a threshold -> answer or abstain.

The numbers live in models/selective.py (the doubt scores, the calibration stored in checkpoint
metadata["selective"], the interpolation between stored coverages); this module applies them to
one served sample and says which requests it cannot honour, as messages the engine turns into
422s. It imports nothing of engine.py (the engine imports it): a sample's trace is read through
its attributes (logits, entropy, residual, iterations, converged, features).

What is refused below coverage 1, and why:
- a checkpoint without the calibration: no threshold exists;
- a coverage under the lowest stored one: no extrapolation past what was measured;
- the entropy-reduction defense, a deadline: the thresholds were measured on plain, full solves;
- for scores that read the solver's path (`SOLVE_DEPENDENT`), another solver, tolerance or
  budget than the calibrated one;
- the `detector` score where the backend computes no dynamics features (ONNX).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .schema import Selective


def trace_result(trace: Any) -> Any:
    """A one-sample `models.classifier.SolveResult` from a served trace, so that the scoring
    functions of models/ run unchanged on it."""
    import torch

    from deqguard.models.classifier import SolveResult

    feats = None if trace.features is None else {
        k: torch.tensor([v], dtype=torch.float64) for k, v in trace.features.items()}
    return SolveResult(
        logits=torch.from_numpy(np.asarray(trace.logits, np.float32))[None],
        entropy=torch.from_numpy(np.asarray(trace.entropy, np.float32))[:, None],
        residual=torch.from_numpy(np.asarray(trace.residual, np.float32))[:, None],
        iterations=torch.tensor([trace.iterations]),
        converged=torch.tensor([trace.converged]), features=feats)


class Selector:
    """The checkpoint's selective calibration (or None) and the learned detector it may read."""

    def __init__(self, calibration: Any = None, detector: Any = None):
        self.calibration = calibration  # models.selective.SelectiveCalibration | None
        self.detector = detector  # models.learned_detector.LogisticDetector | None

    def needs_features(self, opts: Any) -> bool:
        """Whether answering `opts` needs the dynamics features (the `detector` score)."""
        cal = self.calibration
        return (cal is not None and cal.score == "detector" and opts.coverage < 1
                and opts.defense == "none")

    def problem(self, opts: Any, *, features: bool, deadline: bool = False) -> str | None:
        """Why `opts` (a SolveOptions) cannot be answered selectively, or None when it can.

        `features`: whether this backend computes dynamics features; `deadline`: the request
        set deadline_ms.
        """
        c = opts.coverage
        if not (isinstance(c, int | float) and 0 < c <= 1):
            return f"coverage must be a number in (0, 1] (1: always answer), got {c!r}"
        if c >= 1:
            return None
        cal = self.calibration
        if cal is None:
            return (f"coverage {c:g} needs a selective calibration, and this checkpoint has none "
                    "(metadata 'selective'): send coverage 1 (always answer), or calibrate it "
                    "with `deqguard eval CKPT --attacks clean --calibrate-selective` (CKPT: the "
                    "checkpoint file this server loads) and restart the server")
        if c < cal.min_coverage:
            return (f"coverage {c:g} is below the lowest calibrated coverage "
                    f"{cal.min_coverage:g} of this checkpoint; ask for {cal.min_coverage:g} to 1")
        if opts.defense != "none":
            return (f"coverage below 1 applies to the plain solve, not to the {opts.defense} "
                    "defense: its thresholds were calibrated without the defense")
        if deadline:
            return ("coverage below 1 needs a full solve (its thresholds were calibrated on "
                    "full solves); drop deadline_ms")
        if cal.score == "detector" and (not features or self.detector is None):
            return ("this checkpoint's selective score is the learned detector, whose dynamics "
                    "features this backend does not compute (they need autograd): use the torch "
                    "backend, or send coverage 1")
        from deqguard.models.selective import SOLVE_DEPENDENT

        if cal.score in SOLVE_DEPENDENT:
            want = cal.solve
            got = {"solver": opts.solver, "tol": opts.tol, "max_iter": opts.max_iter}
            for key, value in got.items():
                calibrated = getattr(want, key)
                if calibrated is not None and calibrated != value:
                    return (f"the selective score {cal.score} depends on the solve and was "
                            f"calibrated with {key}={calibrated}; this request runs "
                            f"{key}={value}. Leave {key} at the checkpoint's default, or send "
                            "coverage 1")
        return None

    def __call__(self, trace: Any, opts: Any) -> tuple[bool, Selective]:
        """(abstained, the Selective block) for one sample solved under `opts`."""
        cal = self.calibration
        if cal is None:
            return False, Selective(coverage=float(opts.coverage))
        from deqguard.models.selective import doubt_score

        score: float | None = None
        if cal.score != "detector" or (trace.features is not None and self.detector is not None):
            score = float(doubt_score(trace_result(trace), cal.score, self.detector)[0])
        threshold = cal.threshold(opts.coverage)
        abstained = threshold is not None and score is not None and score > threshold
        return abstained, Selective(coverage=float(opts.coverage), score_name=cal.score,
                                    score=score, threshold=threshold)

    def describe(self) -> dict[str, Any] | None:
        """What GET /model says under serving.selective (the full block is in the metadata)."""
        cal = self.calibration
        if cal is None:
            return None
        return {"score": cal.score, "coverages": list(cal.coverages),
                "min_coverage": cal.min_coverage, "n_calibration": cal.n_calibration,
                "solve": cal.solve.model_dump()}
