"""The JSON of the adaptive-selective part: settings, and per score and coverage what the doubt
score is worth against an attack aimed at it (schema.py includes both in the eval report)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deqguard.models.config import GradMode

from .schema_fields import BootstrapReps, DoubtScores, Interval, SetsCache
from .schema_fields import StrictModel as _Model


class AdaptiveSelectiveSettings(_Model):
    """The part `--attacks ...,adaptive-selective`."""

    scores: DoubtScores = Field(description="doubt scores attacked (detector: when the "
                                "checkpoint has a learned detector; a feedforward only has the "
                                "logit scores)")
    coverages: list[float] = Field(default_factory=lambda: [0.8, 0.9],
                                   description="clean coverages whose thresholds are attacked")
    iters: int = Field(100, ge=1, description="iterations of every APGD run")
    restarts: int = Field(1, ge=0, description="untargeted runs from random starts")
    targets: int = Field(3, ge=0, description="targeted DLR runs, one per top wrong class of "
                         "the clean answer (capped at classes - 1)")
    loss: Literal["ce", "dlr"] = Field("ce", description="stage-1 loss of the untargeted runs")
    pgd_steps: int = Field(40, ge=1, description="the PGD baseline's steps on the same images")
    pgd_gradient: GradMode = "exact"
    reps: BootstrapReps = 1000
    cache: SetsCache = None


class AdaptiveSelectiveRow(_Model):
    """One score at one coverage. Rates are over the n test images; intervals are bootstrap
    95% with clean and attacked inputs of an image resampled together."""

    score: str
    coverage: float = Field(description="the clean coverage the threshold was set for")
    threshold: float
    threshold_source: Literal["checkpoint", "validation"] = Field(
        description="checkpoint: the served calibration; validation: set here on --val-n "
        "clean validation images the same way")
    attack: dict[str, Any]
    clean_coverage: float = Field(description="share of clean test images answered")
    clean_coverage_ci: Interval = None
    clean_accuracy_answered: float | None = None
    clean_accuracy_answered_ci: Interval = None
    attack_error_rate: float = Field(description="share of attacked images answered wrongly "
                                     "or abstained on with a wrong answer (misclassified)")
    attack_error_rate_ci: Interval = None
    pgd_error_rate: float = Field(description="PGD's error rate on the same images")
    weaker_than_pgd: bool = Field(description="attack_error_rate < pgd_error_rate")
    attacked_coverage: float = Field(description="share of attacked images answered")
    attacked_coverage_ci: Interval = None
    attacked_accuracy_answered: float | None = Field(
        None, description="accuracy among the answered attacked images (None: none answered)")
    attacked_accuracy_answered_ci: Interval = None
    n_successful: int = Field(description="attacks that flipped a correct clean answer")
    successful_answered: float | None = Field(
        None, description="share of those the score answers (None: no successful attack)")
    successful_answered_ci: Interval = None
    wrong_answered: float = Field(description="share of all images given a wrong answer: "
                                  "what the attacker wins")
    wrong_answered_ci: Interval = None
    aurc_clean: float
    aurc_clean_ci: Interval = None
    augrc_clean: float
    augrc_clean_ci: Interval = None
    aurc_attacked: float
    aurc_attacked_ci: Interval = None
    augrc_attacked: float
    augrc_attacked_ci: Interval = None
    seconds: float = Field(description="time to get this set in this run (chunks read from the "
                           "cache cost about 0)")


class AdaptiveSelectiveSection(_Model):
    n: int
    eps: float
    clean_accuracy: float
    n_val: int | None = None
    served_score: str | None = Field(None, description="the checkpoint's calibrated score")
    pgd: dict[str, Any] = Field(description="the baseline: name, spec, error_rate")
    rows: list[AdaptiveSelectiveRow] = Field(default_factory=list)
    best: dict[str, str] = Field(
        default_factory=dict, description="per coverage, the score with the highest accuracy "
        "among the answered under its own attack (ties: fewer wrong answers given)")
    skipped: list[str] = Field(default_factory=list)
    bootstrap_reps: int
