"""Selective answers in the service: a request's coverage -> a threshold -> answer or abstain.

The numbers live in models/selective.py (the doubt scores, the calibration stored in checkpoint
metadata["selective"], the interpolation between stored coverages, the lowest coverage they
serve); this module applies them to one served sample and says which requests it cannot honour,
as messages the engine turns into 422s. A coverage outside the valid range is refused earlier,
with the other option rules (options.py).

What is refused below full coverage, and why:
- a checkpoint without the calibration: no threshold exists;
- a coverage under the lowest stored one: no extrapolation past what was measured;
- the entropy-reduction defense, a deadline: the thresholds were measured on plain, full solves;
  the server's own deadline (its compute budget) is no reason to refuse: an answer it cut
  abstains instead;
- for scores that read the solver's path (`SOLVE_DEPENDENT`), another solver, tolerance or
  budget than the calibrated one;
- the `detector` and `rectified` scores where the backend computes no dynamics features and
  runs no rectifier head (ONNX: its graph is the classifier's logits only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deqguard.models.selective import SOLVE_DEPENDENT, doubt_score
from deqguard.solve_rules import BUDGET_STOP, FULL_COVERAGE

from .options import SolveOptions
from .schema import Selective
from .traces import SampleTrace, stack_traces

_FULL = f"{FULL_COVERAGE:g}"
# Doubt scores `Selector.batch` computes for a whole batch at once: each reads a sample's own
# answer only (elementwise sums, a row-wise softmax), so its float does not depend on the batch.
# The others (trajectory means, entropy sums, the rectifier) stay per sample.
_BATCHED = frozenset({"detector", "max_softmax"})


class Selector:
    """The checkpoint's selective calibration (or None) and the learned detector it may read."""

    def __init__(self, calibration: Any = None, detector: Any = None):
        self.calibration = calibration  # models.selective.SelectiveCalibration | None
        self.detector = detector  # models.learned_detector.LogisticDetector | None

    def reads_dynamics(self, opts: SolveOptions) -> bool:
        """Whether a decision reads this request's solve (any coverage below full): its
        thresholds were set on full solves, so the settled exit stands aside."""
        return opts.coverage < FULL_COVERAGE

    def needs_features(self, opts: SolveOptions) -> bool:
        """Whether answering `opts` needs the dynamics features (the `detector` score)."""
        cal = self.calibration
        return (cal is not None and cal.score == "detector" and self.reads_dynamics(opts)
                and opts.defense == "none")

    def problem(self, opts: SolveOptions, *, features: bool, deadline: bool = False
                ) -> str | None:
        """Why `opts` (valid options) cannot be answered selectively, or None when they can.

        `features`: whether this backend computes dynamics features (and runs the rectifier
        head: the torch backend does both); `deadline`: the request set deadline_ms.
        """
        c = opts.coverage
        if not self.reads_dynamics(opts):
            return None
        cal = self.calibration
        if cal is None:
            return (f"coverage {c:g} needs a selective calibration, and this checkpoint has none "
                    f"(metadata 'selective'): send coverage {_FULL} (always answer), or "
                    "calibrate it with `deqguard eval CKPT --attacks clean "
                    "--calibrate-selective` (CKPT: the checkpoint file this server loads) and "
                    "restart the server")
        lowest = cal.coverage_problem(c)
        if lowest:
            return lowest
        if opts.defense != "none":
            return (f"coverage below {_FULL} applies to the plain solve, not to the "
                    f"{opts.defense} defense: its thresholds were calibrated without the defense")
        if deadline:
            return (f"coverage below {_FULL} needs a full solve (its thresholds were calibrated "
                    "on full solves); drop deadline_ms")
        if cal.score == "detector" and (not features or self.detector is None):
            return ("this checkpoint's selective score is the learned detector, whose dynamics "
                    "features this backend does not compute (they need autograd): use the torch "
                    f"backend, or send coverage {_FULL}")
        if cal.score == "rectified" and not features:
            return ("this checkpoint's selective score is its rectifier head, which this backend "
                    f"does not run: use the torch backend, or send coverage {_FULL}")
        if cal.score in SOLVE_DEPENDENT:
            want = cal.solve
            got = {"solver": opts.solver, "tol": opts.tol, "max_iter": opts.max_iter}
            for key, value in got.items():
                calibrated = getattr(want, key)
                if calibrated is not None and calibrated != value:
                    return (f"the selective score {cal.score} depends on the solve and was "
                            f"calibrated with {key}={calibrated}; this request runs "
                            f"{key}={value}. Leave {key} at the checkpoint's default, or send "
                            f"coverage {_FULL}")
        return None

    def __call__(self, trace: SampleTrace, opts: SolveOptions) -> tuple[bool, Selective]:
        """(abstained, the Selective block) for one sample solved under `opts`."""
        cal = self.calibration
        if cal is None:
            return False, Selective(coverage=float(opts.coverage))
        score: float | None = None
        if cal.score != "detector" or (trace.features is not None and self.detector is not None):
            score = float(doubt_score(trace.as_result(), cal.score, self.detector)[0])
        return self._decide(trace, score, cal.threshold(opts.coverage), opts)

    def batch(self, traces: Sequence[SampleTrace], opts: SolveOptions
              ) -> list[tuple[bool, Selective]]:
        """`self(t, opts)` for each trace, with the doubt score of all of them in one call where
        the score allows it (`_BATCHED`); equal to the one-sample calls, answer for answer."""
        cal = self.calibration
        if cal is None or cal.score not in _BATCHED or not traces:
            return [self(t, opts) for t in traces]
        batch = stack_traces(traces)
        if cal.score == "detector" and (batch.features is None or self.detector is None):
            return [self(t, opts) for t in traces]
        scores = doubt_score(batch, cal.score, self.detector).tolist()
        threshold = cal.threshold(opts.coverage)
        return [self._decide(t, score, threshold, opts)
                for t, score in zip(traces, scores, strict=True)]

    def _decide(self, trace: SampleTrace, score: float | None, threshold: float | None,
                opts: SolveOptions) -> tuple[bool, Selective]:
        """(abstained, the Selective block) from a sample's doubt score: one rule for the
        one-sample and the batched path."""
        abstained = threshold is not None and score is not None and score > threshold
        # A solve the server's budget cut is not the full solve the threshold was set on: below
        # full coverage it is not answered, whatever its score.
        abstained = abstained or (trace.stopped == BUDGET_STOP and self.reads_dynamics(opts))
        return abstained, Selective(coverage=float(opts.coverage),
                                    score_name=self.calibration.score, score=score,
                                    threshold=threshold)

    def describe(self) -> dict[str, Any] | None:
        """What GET /model says under serving.selective (the full block is in the metadata)."""
        cal = self.calibration
        if cal is None:
            return None
        return {"score": cal.score, "coverages": list(cal.coverages),
                "min_coverage": cal.min_coverage, "n_calibration": cal.n_calibration,
                "solve": cal.solve.model_dump()}
