"""The checkpoint's attack detector applied to one served sample: the answer's `detection` block.

The learned detector (metadata["detector"], models/learned_detector.py) wins when the sample's trace
carries the dynamics features it reads (torch engine, no defense, detect=true). Otherwise the
single-score calibration (metadata["detection"], models/detection.py) applies; before one exists
the score is the final prediction entropy, the threshold null and `suspicious` false. A
calibration made for another defense than the request's is not applied (its threshold would be
meaningless there): the score is still computed and returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deqguard.models.detection_scores import DetectionCalibration, detection_score

from .options import SolveOptions
from .schema import Detection
from .traces import SampleTrace, stack_traces


class Detector:
    """The checkpoint's calibration and learned detector (either may be absent)."""

    def __init__(self, calibration: dict[str, Any] | None, learned: Any = None):
        self.calibration = (DetectionCalibration.model_validate(calibration)
                            if calibration else None)
        self.learned = learned  # models.detector.LogisticDetector | None

    def wants_features(self, opts: SolveOptions) -> bool:
        return self.learned is not None and opts.detect and opts.defense == "none"

    def calibrated_for(self, defense: str) -> bool:
        """A calibration made for another defense is not applied: its threshold means nothing."""
        return self.calibration is not None and (self.calibration.defense or "none") == defense

    def reads_dynamics(self, opts: SolveOptions) -> bool:
        """Whether a calibrated detector will read this request's trajectory or features."""
        return opts.detect and (self.wants_features(opts) or self.calibrated_for(opts.defense))

    def batch(self, traces: Sequence[SampleTrace], defense: str, detect: bool = True
              ) -> list[Detection]:
        """`self(t, defense, detect)` for each trace, with the learned detector scoring them all
        in one call: per sample its Python overhead cost more than the score itself. The score
        of a row does not depend on its batch mates (LogisticDetector.score), so each
        Detection equals the one-sample call's."""
        det = self.learned
        feats = stack_traces(traces).features if det is not None and detect and traces else None
        if det is None or feats is None:
            return [self(t, defense, detect) for t in traces]
        return [self._learned_detection(score) for score in det.score(feats).tolist()]

    def _learned_detection(self, score: float) -> Detection:
        """The block the learned detector's score answers, one- or many-sample."""
        det = self.learned
        return Detection(score_name=det.name, score=score, threshold=float(det.threshold),
                         suspicious=bool(score > det.threshold), detector=det.name,
                         fpr=float(det.fpr))

    def __call__(self, trace: SampleTrace, defense: str, detect: bool = True) -> Detection:
        if self.learned is not None and detect and trace.features is not None:
            return self._learned_detection(float(self.learned.score(trace.features)[0]))
        cal = self.calibration
        name = cal.score if cal else "final_entropy"
        kwargs = {"early_index": cal.early_index, "params": cal.params} if cal else {}
        score = float(detection_score(trace.as_result(), name, **kwargs)[0])
        if not detect:
            return Detection(score_name=name, score=score, threshold=None, suspicious=False,
                             detector="off")
        if cal is None or not self.calibrated_for(defense):
            return Detection(score_name=name, score=score, threshold=None, suspicious=False,
                             detector="uncalibrated")
        return Detection(score_name=name, score=score, threshold=float(cal.threshold),
                         suspicious=bool(score > cal.threshold), detector="calibration",
                         fpr=float(cal.fpr))
