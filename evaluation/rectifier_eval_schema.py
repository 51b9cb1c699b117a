"""The JSON of the rectifier-aware part: what the rectified doubt score is worth against attacks
aimed at its head, and what it costs in answers under a doubt-raising nudge (schema.py includes
both in the eval report)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deqguard.models.config import GradMode

from .schema_fields import Interval
from .schema_fields import StrictModel as _Model

RECTIFIER_ATTACKS: tuple[str, ...] = ("lam-pgd", "multi-targeted", "over-rejection")


class RectifierEvalSettings(_Model):
    """The part `--attacks ...,rectifier-aware`."""

    attacks: list[str] = Field(default_factory=lambda: list(RECTIFIER_ATTACKS),
                               description="lam-pgd: PGD on CE + lam BCE(R, stopgrad p_y); "
                               "multi-targeted: PGD on log p_t + log sigmoid(A) per top wrong "
                               "class t; over-rejection: a doubt-raising PGD at eps x "
                               "over_rejection_eps that keeps the answer")
    lambdas: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    targets: int = Field(3, ge=1, description="top wrong classes of the clean logits attacked")
    steps: int = Field(40, ge=1, description="PGD steps of every rectifier-aware attack")
    coverages: list[float] = Field(default_factory=lambda: [0.8, 0.9])
    over_rejection_eps: float = Field(0.25, gt=0, le=1, description="the doubt-raising "
                                      "attack's radius as a fraction of eps")
    pgd_steps: int = Field(40, ge=1, description="the PGD baseline's steps on the same images")
    pgd_gradient: GradMode = "exact"
    reps: int = Field(1000, ge=1, description="bootstrap resamples")
    cache: str | None = Field(None, description="folder of the crafted sets (resumable)")


class RectifierAttackRow(_Model):
    """One attack (or the per-image worst case over them) judged on one served score at one
    clean-calibrated threshold. Rates are over the n test images; intervals bootstrap 95%."""

    score: str
    attack: str = Field(description="pgdN-exact (baseline), lam<l>, target<j> (j-th top wrong "
                        "class), or worst-case (per image over the lam and target sets: wrong "
                        "and answered first, then wrong with the lowest doubt)")
    coverage: float
    threshold: float
    threshold_source: Literal["checkpoint", "validation"]
    clean_coverage: float
    clean_accuracy_answered: float | None = None
    attack_error_rate: float
    attack_error_rate_ci: Interval = None
    pgd_error_rate: float
    weaker_than_pgd: bool = Field(description="attack_error_rate < pgd_error_rate")
    attacked_coverage: float
    attacked_accuracy_answered: float | None = None
    attacked_accuracy_answered_ci: Interval = None
    n_successful: int
    successful_answered: float | None = None
    successful_answered_ci: Interval = None
    wrong_answered: float
    wrong_answered_ci: Interval = None


class OverRejectionRow(_Model):
    """A doubt-raising nudge (answer kept) on clean test images, at one threshold."""

    score: str
    coverage: float
    threshold: float
    threshold_source: Literal["checkpoint", "validation"]
    eps: float = Field(description="the nudge's L-inf radius")
    clean_coverage: float
    nudged_coverage: float = Field(description="share answered after the nudge")
    answer_kept: float = Field(description="share whose served answer the nudge left unchanged")
    pushed_out: float = Field(description="share of all images answered clean, abstained on "
                              "after the nudge with the same answer")
    pushed_out_ci: Interval = None
    pushed_out_of_answered: float | None = Field(
        None, description="pushed_out over the clean-answered share")
    correct_pushed_out: float = Field(description="share of all images answered correctly "
                                      "clean and abstained on after the nudge")
    correct_pushed_out_ci: Interval = None


class RectifierEvalSection(_Model):
    n: int
    eps: float
    clean_accuracy: float
    n_val: int | None = None
    served_score: str | None = None
    head_trajectory: int = Field(description="iterates of the solver path the head reads (0: "
                                 "the state only); the attacks' gradient reaches A through the "
                                 "state and those features, judged on the served score")
    pgd: dict[str, Any]
    attack: dict[str, Any] = Field(default_factory=dict, description="the attacks' spec")
    rows: list[RectifierAttackRow] = Field(default_factory=list)
    over_rejection: list[OverRejectionRow] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict)
    bootstrap_reps: int
