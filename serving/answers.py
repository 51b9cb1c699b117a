"""A sample's trace -> its JSON answer (`ClassifyResult`): prediction, trajectories, detection,
selective decision.

It needs the checkpoint's metadata, not its model, so processes that only build answers (local
scoring's row workers) build them exactly as the server does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deqguard.models.learned_detector import detector_from_metadata
from deqguard.models.selective import selective_from_metadata

from .attack_detection import Detector
from .options import SolveOptions
from .schema import ClassifyResult, Detection, ModelRef, Selective
from .selective import Selector
from .traces import SampleTrace


class AnswerBuilder:
    """The checkpoint's classes, detector and selective calibration, applied to traces."""

    def __init__(self, meta: Any):
        """`meta`: the checkpoint's `models.CheckpointMetadata`; CheckpointError when one of
        its metadata blocks (detector, selective calibration) is unusable."""
        learned = detector_from_metadata(meta)
        self.detector = Detector(meta.detection, learned)
        self.selector = Selector(selective_from_metadata(meta), learned)
        self.classes = list(meta.classes)
        self.model_ref = ModelRef(name=meta.name or "unnamed", sha256=meta.sha256)

    def answer(self, trace: SampleTrace, opts: SolveOptions, trajectory: bool
               ) -> ClassifyResult:
        """The answer to one sample solved under `opts`; `trajectory` false leaves the
        per-iterate entropy and residual out."""
        label = int(trace.logits.argmax())
        probs = torch.softmax(trace.logits.double(), dim=-1)
        abstained, selective = self.selector(trace, opts)
        return self._result(trace, label, probs.tolist(), trajectory,
                            self.detector(trace, opts.defense, opts.detect), abstained,
                            selective)

    def answers(self, traces: Sequence[SampleTrace], opts: Sequence[SolveOptions],
                trajectory: Sequence[bool]) -> list[ClassifyResult]:
        """`answer` for each (trace, options, trajectory flag), the same answers, with the
        label, probabilities, detector and doubt scores computed once per distinct options
        over all their traces: one sample at a time that Python cost about a tenth of the
        engine's time on the compute thread. Each score is row by row arithmetic, so a sample's
        answer does not depend on its batch mates (tests/test_serving_answers_batch.py)."""
        groups: dict[SolveOptions, list[int]] = {}
        for i, o in enumerate(opts):
            groups.setdefault(o, []).append(i)
        out: list[ClassifyResult | None] = [None] * len(traces)
        for o, idx in groups.items():
            ts = [traces[i] for i in idx]
            logits = torch.stack([t.logits for t in ts])
            labels = logits.argmax(dim=-1).tolist()
            probs = torch.softmax(logits.double(), dim=-1).tolist()
            detections = self.detector.batch(ts, o.defense, o.detect)
            selections = self.selector.batch(ts, o)
            for j, i in enumerate(idx):
                abstained, selective = selections[j]
                out[i] = self._result(ts[j], labels[j], probs[j], trajectory[i], detections[j],
                                      abstained, selective)
        return out  # type: ignore[return-value]

    def _result(self, trace: SampleTrace, label: int, probs: list[float], trajectory: bool,
                detection: Detection, abstained: bool, selective: Selective) -> ClassifyResult:
        return ClassifyResult(
            label=label, class_name=self.classes[label], probabilities=probs,
            entropy=trace.entropy.tolist() if trajectory else [],
            residual=trace.residual.tolist() if trajectory else [],
            iterations=trace.iterations, converged=trace.converged, stopped=trace.stopped,
            detection=detection, abstained=abstained, selective=selective, model=self.model_ref)
