"""The learned attack detector: a logistic model over dynamics features, stored as plain numbers.

A detector is fitted offline (`deqguard.evaluation.detector_fit`) on clean vs attacked
*validation* images and written into checkpoint metadata["detector"] (a key of its own, so the
older single-score calibration in metadata["detection"] can be rewritten independently). Its
stored form is numbers only: feature names, standardisation mean/std, coefficients, intercept,
threshold, the false-positive rate the threshold was calibrated at, the `DynamicsConfig` that
computes the features, and a description of its training data. Scoring is a dot product, so
serving needs neither scikit-learn nor a pickle. A block that does not validate (unknown or
repeated features, lengths that disagree, non-finite numbers, fitted for other tensors) is
refused with a message naming the problem.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from .dynamics import FEATURE_NAMES, DynamicsConfig
from .metadata_block import read_block

DETECTOR_VERSION = 1
METADATA_KEY = "detector"


class LogisticDetector(BaseModel):
    """score = intercept + sum_i coef_i (feature_i - mean_i) / std_i; suspicious if > threshold.

    The score is the log-odds of "attacked" under the fitted model; `threshold` was set so that
    a fraction `fpr` of the clean calibration images score above it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["logistic"] = "logistic"
    version: int = DETECTOR_VERSION
    name: str = "dynamics-logistic"
    features: list[str]
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    fpr: float = Field(ge=0, le=1)
    dynamics: DynamicsConfig = DynamicsConfig()
    model_sha256: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> LogisticDetector:
        if self.version != DETECTOR_VERSION:
            raise ValueError(f"detector version {self.version}, this deqguard reads "
                             f"{DETECTOR_VERSION}")
        if not self.features:
            raise ValueError("a detector needs at least one feature")
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {list(FEATURE_NAMES)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError("repeated feature names")
        missing = [f for f in self.features if f not in self.dynamics.names()]
        if missing:
            raise ValueError(f"features {missing} are not computed by the stored dynamics "
                             "config (switched off there)")
        n = len(self.features)
        for key in ("mean", "std", "coef"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key} has {len(getattr(self, key))} values for {n} features")
        numbers = [*self.mean, *self.std, *self.coef, self.intercept, self.threshold]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError("non-finite number in the detector (mean, std, coef, intercept "
                             "or threshold)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive for every feature")
        return self

    def score(self, features: dict[str, Tensor]) -> Tensor:
        """[B] log-odds from {name: [B]} features (extra features are ignored).

        The terms are summed as a cumulative sum, not a matrix product: BLAS orders a dot
        product's additions by the matrix's shape, so `@` gives a row another last bit in a
        batch of 32 than alone, whereas torch's CPU cumsum adds each row's terms one after the
        other, left to right. A sample's score is then the same float however it was batched
        (served alone, in a micro-batch, or in an evaluation's batch).
        """
        absent = [f for f in self.features if f not in features]
        if absent:
            raise ValueError(f"features {absent} were not computed")
        x = torch.stack([features[f] for f in self.features], dim=-1)
        mean = x.new_tensor(self.mean)
        std = x.new_tensor(self.std)
        coef = x.new_tensor(self.coef)
        terms = (x - mean) / std * coef
        return terms.cumsum(dim=-1)[..., -1] + self.intercept

    def decide(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(score [B], suspicious [B] bool)."""
        s = self.score(features)
        return s, s > self.threshold


def detector_from_metadata(meta: Any) -> LogisticDetector | None:
    """The checkpoint's learned detector, or None; CheckpointError if its block is unusable."""
    return read_block(meta, METADATA_KEY, LogisticDetector, what="detector", verb="fitted",
                      meaning="its threshold means",
                      fix="Refit it (deqguard detect fit CKPT --write)")
