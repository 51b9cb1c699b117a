"""Selective answers: a per-sample doubt score, and thresholds that answer a chosen share of inputs.

A detector that flags one attack in five is a weak alarm, but the same signal is a usable
confidence: answer when sure, abstain otherwise, at a coverage (share of clean inputs answered)
the caller picks. Convention: every score is a *doubt*, higher = less sure, and a sample is
answered when `score <= threshold`. The threshold for coverage c is the empirical c-quantile of
the doubt scores of clean validation images, chosen so that the share of those images it answers
is within 1/n of c (`coverage_threshold`).

A calibration stores thresholds for several coverages in checkpoint metadata["selective"] (a key
of its own, like the learned detector's "detector"), with the score, the solve it was measured
on, how many images, and where they came from. A requested coverage between two stored ones is
served by interpolating their thresholds linearly (`SelectiveCalibration.threshold`).

Scores, all computed by functions that already exist (none is re-implemented here):
`detector` (the learned detector's log-odds, models/learned_detector.py, over the solve's
dynamics features), and `mean_entropy`, `final_entropy`, `max_softmax` (1 - max p) and
`iterations` from `models.detection_scores.detection_score`, and `rectified` (1 - max p x
sigmoid(A), the trained rectifier head of models/rectifier.py, for a checkpoint that has one).
`detector`, `mean_entropy`, `iterations` and `rectified` (whose head may read the trajectory)
read the solver's path, not only its answer, so their thresholds hold only for the solve they
were calibrated on (`SOLVE_DEPENDENT`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from deqguard.solve_rules import FULL_COVERAGE, coverage_problem

from .classifier import SolveResult
from .detection_scores import detection_score
from .errors import CheckpointError
from .metadata_block import read_block
from .rectifier import rectified_doubt

SELECTIVE_VERSION = 1
METADATA_KEY = "selective"
ScoreName = Literal["detector", "mean_entropy", "final_entropy", "max_softmax", "iterations",
                    "rectified"]
SCORE_NAMES: tuple[str, ...] = ("detector", "mean_entropy", "final_entropy", "max_softmax",
                                "iterations", "rectified")
# Scores that read the solver's trajectory or features: another solver, tolerance or budget
# moves them, so a threshold calibrated on one solve means nothing on another.
SOLVE_DEPENDENT: frozenset[str] = frozenset({"detector", "mean_entropy", "iterations",
                                             "rectified"})
# Dense towards 1, where the last segment ends at the largest calibration score (a coarse step).
DEFAULT_COVERAGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9,
                                        0.95, 0.98, 0.99, FULL_COVERAGE)


class SolveSpec(BaseModel):
    """The solve the calibration scores came from (the checkpoint's defaults, no early exit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    solver: str | None = None
    max_iter: int | None = None
    tol: float | None = None


class SelectiveCalibration(BaseModel):
    """Thresholds of one doubt score at several coverages, as stored in metadata["selective"].

    `realised[i]` is the share of the calibration images answered at `thresholds[i]` (within
    1/n_calibration of `coverages[i]` unless tied scores make that impossible, as with the
    integer `iterations`). The last coverage is 1.0: its threshold is the largest calibration
    score, used only to interpolate towards 1; a request for coverage 1 always answers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = SELECTIVE_VERSION
    score: ScoreName
    coverages: list[float]
    thresholds: list[float]
    realised: list[float]
    n_calibration: int = Field(ge=1)
    solve: SolveSpec = SolveSpec()
    model_sha256: str = ""
    detector_fingerprint: str = Field(
        "", description="score 'detector': `detector_fingerprint` of the learned detector the "
        "thresholds were set with (a refitted detector scores on another scale)")
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SelectiveCalibration:
        if self.version != SELECTIVE_VERSION:
            raise ValueError(f"selective calibration version {self.version}, this deqguard "
                             f"reads {SELECTIVE_VERSION}")
        n = len(self.coverages)
        if n < 2 or len(self.thresholds) != n or len(self.realised) != n:
            raise ValueError(f"need at least two coverages with one threshold and one realised "
                             f"coverage each; got {n}, {len(self.thresholds)} and "
                             f"{len(self.realised)}")
        bad = [p for p in map(coverage_problem, self.coverages) if p]
        if bad:
            raise ValueError(bad[0])
        if self.coverages[-1] != FULL_COVERAGE:
            raise ValueError(f"coverages must end at {FULL_COVERAGE}")
        if any(b <= a for a, b in zip(self.coverages, self.coverages[1:], strict=False)):
            raise ValueError("coverages must be strictly increasing")
        if not all(math.isfinite(t) for t in self.thresholds):
            raise ValueError("non-finite threshold")
        if any(b < a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError("thresholds must not decrease with coverage")
        return self

    @property
    def min_coverage(self) -> float:
        return self.coverages[0]

    def coverage_problem(self, coverage: float) -> str | None:
        """Why these thresholds cannot serve `coverage`, or None: outside the valid range, or
        below the lowest stored coverage (nothing is extrapolated past what was measured)."""
        problem = coverage_problem(coverage)
        if problem or coverage >= self.min_coverage:
            return problem
        return (f"coverage {coverage:g} is below the lowest calibrated coverage "
                f"{self.min_coverage:g} of this checkpoint; ask for {self.min_coverage:g} to "
                f"{FULL_COVERAGE:g}")

    def threshold(self, coverage: float) -> float | None:
        """The doubt threshold for `coverage`: None at full coverage (answer everything), linear
        between stored coverages; ValueError where `coverage_problem` names one."""
        problem = self.coverage_problem(coverage)
        if problem:
            raise ValueError(problem)
        if coverage >= FULL_COVERAGE:
            return None
        return float(np.interp(coverage, self.coverages, self.thresholds))


def coverage_threshold(scores: np.ndarray | Tensor, coverage: float) -> tuple[float, float]:
    """(threshold, realised coverage) so that `scores <= threshold` answers about `coverage`.

    The threshold is the k-th smallest score, k = ceil(c n): the empirical c-quantile, which
    answers k/n in [c, c + 1/n) of distinct scores. When ties at that score would answer more
    than c + 1/n, the next smaller score is taken instead if it lands closer to c.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = s.size
    if n == 0:
        raise ValueError("no scores to calibrate on")
    problem = coverage_problem(coverage)
    if problem:
        raise ValueError(problem)
    if not np.isfinite(s).all():
        raise ValueError("non-finite doubt scores")
    k = min(max(math.ceil(coverage * n - 1e-9), 1), n)
    t = s[k - 1]
    realised = np.searchsorted(s, t, side="right") / n
    first = np.searchsorted(s, t, side="left")
    if realised - coverage > 1 / n and first > 0:
        lower = s[first - 1]
        r_lower = np.searchsorted(s, lower, side="right") / n
        if abs(r_lower - coverage) < abs(realised - coverage):
            t, realised = lower, r_lower
    return float(t), float(realised)


def detector_fingerprint(detector: Any) -> str:
    """A short hash of a learned detector's stored form (a LogisticDetector of
    models/learned_detector.py): thresholds on its score hold for that detector only."""
    return hashlib.sha256(detector.model_dump_json().encode()).hexdigest()[:16]


def calibrate(scores: np.ndarray | Tensor, score: str,
              coverages: tuple[float, ...] | list[float] = DEFAULT_COVERAGES, *,
              solve: SolveSpec | dict[str, Any] | None = None, model_sha256: str = "",
              detector: Any = None, provenance: dict[str, Any] | None = None,
              metrics: dict[str, Any] | None = None) -> SelectiveCalibration:
    """A calibration from the doubt scores of clean validation images (one per image);
    `detector`: the learned detector that scored them (score "detector")."""
    cov = sorted({float(c) for c in coverages} | {FULL_COVERAGE})
    pairs = [coverage_threshold(scores, c) for c in cov]
    s = np.asarray(scores).ravel()
    if score == "detector" and detector is None:
        raise ValueError("a calibration of the detector score needs the detector that scored")
    return SelectiveCalibration(
        score=score, coverages=cov, thresholds=[t for t, _ in pairs],
        realised=[r for _, r in pairs], n_calibration=int(s.size),
        solve=SolveSpec.model_validate(solve or {}), model_sha256=model_sha256,
        detector_fingerprint=detector_fingerprint(detector) if score == "detector" else "",
        provenance=provenance or {}, metrics=metrics or {})


def doubt_score(result: SolveResult, name: str, detector: Any = None) -> Tensor:
    """Per-sample doubt [B] (higher = less sure) of a solve, by the existing scoring functions.

    `detector` (a models.learned_detector.LogisticDetector) scores the solve's dynamics features
    (`model.solve(..., features=detector.dynamics)` puts them in `result.features`); `rectified`
    reads the head's logit that a model with a rectifier puts in `result.rectifier`.
    """
    if name == "rectified":
        if result.rectifier is None:
            raise ValueError("the rectified score needs a checkpoint with a rectifier head "
                             "(model config 'rectifier', trained by deqguard train)")
        return rectified_doubt(result.logits.detach(), result.rectifier.detach())
    if name == "detector":
        if detector is None:
            raise ValueError("the detector score needs the checkpoint's learned detector")
        if result.features is None:
            raise ValueError("the detector score needs the solve's dynamics features "
                             "(model.solve(x, features=detector.dynamics))")
        return detector.score(result.features)
    if name not in SCORE_NAMES:
        raise ValueError(f"unknown doubt score {name!r}; known: {list(SCORE_NAMES)}")
    return detection_score(result, name)


def selective_from_metadata(meta: Any) -> SelectiveCalibration | None:
    """The checkpoint's selective calibration, or None; CheckpointError if it is unusable."""
    cal = read_block(meta, METADATA_KEY, SelectiveCalibration, what="selective calibration",
                     verb="made", meaning="its thresholds mean",
                     fix="Recalibrate it (deqguard eval CKPT --attacks clean "
                         "--calibrate-selective)")
    if cal is None:
        return None
    if cal.score == "detector":
        from .learned_detector import detector_from_metadata

        det = detector_from_metadata(meta)
        if det is None or detector_fingerprint(det) != cal.detector_fingerprint:
            why = "has no learned detector" if det is None else "has another learned detector"
            raise CheckpointError(
                f"the checkpoint's selective calibration is on the learned detector's score, "
                f"but the checkpoint {why} than the one it was calibrated with (refitted "
                "since?): its thresholds mean nothing here. Recalibrate it (deqguard eval CKPT "
                "--attacks clean --calibrate-selective --selective-score detector) or remove it")
    return cal
