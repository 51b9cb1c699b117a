"""A sample's trace -> its JSON answer (`ClassifyResult`): prediction, trajectories, detection,
selective decision.

It needs the checkpoint's metadata, not its model, so processes that only build answers (local
scoring's row workers) build them exactly as the server does.
"""

from __future__ import annotations

from typing import Any

import torch

from deqguard.models.learned_detector import detector_from_metadata
from deqguard.models.selective import selective_from_metadata

from .attack_detection import Detector
from .options import SolveOptions
from .schema import ClassifyResult, ModelRef
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
        return ClassifyResult(
            label=label, class_name=self.classes[label], probabilities=probs.tolist(),
            entropy=trace.entropy.tolist() if trajectory else [],
            residual=trace.residual.tolist() if trajectory else [],
            iterations=trace.iterations, converged=trace.converged, stopped=trace.stopped,
            detection=self.detector(trace, opts.defense, opts.detect), abstained=abstained,
            selective=selective, model=self.model_ref)
