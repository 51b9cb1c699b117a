"""The JSON written by `deqguard eval`: every number next to the settings that produced it.

`EvalReport.model_json_schema()` is the documented schema (`deqguard eval --schema` prints it).
Accuracies are fractions in [0, 1]. "Evaluated predictor" means the model's deterministic forward
(default solver and budget), behind the entropy-reduction defense when `settings.defense` says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deqguard.models.config import GradMode
from deqguard.models.defense import EntropyReductionConfig
from deqguard.models.selective import DEFAULT_COVERAGES as SELECTIVE_COVERAGES
from deqguard.solve_rules import DEFENSES

from .adaptive_selective_schema import AdaptiveSelectiveSection, AdaptiveSelectiveSettings
from .per_sample import image_range
from .rectifier_eval_schema import RectifierEvalSection, RectifierEvalSettings
from .schema_fields import BootstrapReps, DoubtScores, PerImage, SetsCache
from .schema_fields import StrictModel as _Model
from .slowdown_schema import SlowdownSection, SlowdownSettings

SCHEMA_VERSION = 1
EvalPart = Literal["clean", "pgd", "aa", "adaptive", "detect", "budget", "selective",
                   "slowdown", "adaptive-selective", "rectifier-aware"]
ALL_PARTS: tuple[str, ...] = ("clean", "budget", "pgd", "adaptive", "aa", "detect", "selective",
                              "slowdown", "adaptive-selective", "rectifier-aware")


class SelectiveSettings(_Model):
    """The selective part (`--attacks ...,selective`) and the selective calibration."""

    scores: DoubtScores = Field(description="doubt scores measured (detector: when the "
                                "checkpoint has a learned detector)")
    target_coverage: float = Field(0.9, gt=0, lt=1, description="coverage whose clean-validation "
                                   "threshold the attacked inputs are judged at")
    coverages: list[float] = Field(default_factory=lambda: list(SELECTIVE_COVERAGES),
                                   description="coverages stored by the calibration")
    attack_n: int | None = Field(None, description="PGD on the first N test images (None: all)")
    pgd_steps: int = Field(40, ge=1)
    pgd_gradient: GradMode = "exact"
    adaptive_n: int = Field(100, ge=0, description="detector-aware PGD on the first N test "
                            "images (0: skip; needs a learned detector)")
    adaptive_lambda: float = 2.0
    adaptive_steps: int = Field(10, ge=1)
    reps: BootstrapReps = 1000
    calibrate: bool = Field(False, description="compute the calibration of `score` (the CLI "
                            "writes it into the checkpoint's metadata['selective'])")
    score: str = "max_softmax"
    cache: SetsCache = None
    provenance: dict[str, Any] = Field(default_factory=dict,
                                       description="where the validation images come from")


class EvalSettings(_Model):
    """Everything that changes a number in the report."""

    checkpoint: str
    data: str
    data_dir: str | None = None
    split: str = "test"
    n: int = Field(ge=1)
    start: int = Field(0, ge=0, description="images of the split left out before the n scored: "
                       "per-image outcomes start at image start + 1")
    eps: float = Field(gt=0)
    parts: list[EvalPart]
    defense: Literal[DEFENSES] = "none"
    defense_config: EntropyReductionConfig | None = None
    pgd_steps: int = Field(10, ge=1)
    pgd_restarts: int = Field(1, ge=1)
    step_size: float | None = Field(None, description="None: 2.5 eps / steps")
    gradient_paths: list[str] | None = Field(None, description="None: every path of the model")
    intermediate: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 5), (4, 5), (8, 9)],
        description="(solver iterate i, unrolled steps K) pairs of the paper's attack")
    intermediate_tau: float = 0.5
    bpda_paths: list[str] | None = Field(None, description="None: exact (through the solver "
                                         "steps, input updates straight-through)")
    steps_sweep: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    eps_sweep: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0],
                                   description="multiples of eps")
    large_eps: float = Field(0.5, description="absolute radius where accuracy must reach ~0")
    budgets: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 30, 60])
    aa_version: Literal["standard"] = "standard"
    aa_attacks: list[str] | None = Field(None, description="None: the full standard suite")
    aa_n: int | None = Field(None, description="samples for AutoAttack (None: all n)")
    aa_from: str | None = Field(
        None, description="an earlier report whose AutoAttack stages this run took as they were "
        "and continued (`--aa-from`); None: every stage ran here")
    aa_gradient: GradMode | None = Field(
        None, description="gradient path of AutoAttack's gradient attacks on a DEQ. None: exact "
        "backprop through the solver iterations (the strongest); reports written before this "
        "field existed attacked through the checkpoint's training path (phantom), which "
        "overstates robustness, and have autoattack.gradient null")
    sweep_n: int | None = Field(
        None, description="samples for the gradient-masking sweeps (None: all n)")
    sweep_gradient: GradMode | None = Field(
        None, description="gradient path of the gradient-masking sweeps on an undefended DEQ. "
        "None: exact; reports written before this field existed swept the checkpoint's "
        "training path. sweeps.attack names the path either way")
    detect_scores: list[str] = Field(default_factory=lambda: [
        "final_entropy", "max_softmax", "mean_entropy", "early_entropy", "iterations",
        "final_residual"])
    early_index: int = 1
    detector_lambda: float = Field(0.1, description="weight of the summed trajectory entropy")
    fpr: float = Field(0.05, gt=0, lt=1)
    logistic: bool = False
    calibrate: bool = False
    calibration_score: str = "mean_entropy"
    val_n: int = Field(500, ge=1)
    selective: SelectiveSettings | None = None
    slowdown: SlowdownSettings | None = None
    adaptive_selective: AdaptiveSelectiveSettings | None = None
    rectifier: RectifierEvalSettings | None = None
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    device: str = "cpu"

    @property
    def images(self) -> str:
        """The images scored, as `image_range` writes them."""
        return image_range(self.start, self.n)


class CheckpointInfo(_Model):
    path: str
    name: str = ""
    sha256: str = ""
    arch: str = ""
    is_deq: bool
    solver: dict[str, Any] | None = None


class CleanResult(_Model):
    n: int
    accuracy: float = Field(description="evaluated predictor (defended if a defense is on)")
    accuracy_undefended: float
    converged_fraction: float
    mean_iterations: float
    seconds_per_sample: float
    seconds_per_sample_undefended: float
    overhead_ratio: float = Field(description="inference time with / without the defense")
    correct: PerImage


class BudgetPoint(_Model):
    max_iter: int
    accuracy: float
    converged_fraction: float
    mean_iterations: float
    is_default: bool


class AttackResult(_Model):
    name: str
    spec: dict[str, Any]
    threat: Literal["white-box", "transfer", "adaptive"] = Field(
        description="transfer: crafted on the undefended model, judged on the defended one")
    accuracy: float = Field(description="on the evaluated predictor")
    accuracy_undefended: float | None = Field(None, description="same inputs, no defense")
    n: int
    seconds: float


class WorstCase(_Model):
    accuracy: float
    attacks: list[str] = Field(description="attacks combined per sample")
    n: int
    correct: PerImage


class SweepPoint(_Model):
    value: float
    accuracy: float


class Sweeps(_Model):
    attack: str = Field(description="the attack swept (spec of the primary attack)")
    steps: list[SweepPoint] = Field(description="value = PGD steps, at settings.eps")
    eps: list[SweepPoint] = Field(description="value = radius, at settings.pgd_steps")
    monotone_steps: bool
    monotone_eps: bool
    large_eps_accuracy: float | None


class EarlierAutoAttack(_Model):
    """Where the stages an `--aa-from` run did not rerun come from."""

    report: str
    created: str
    stages: list[str]
    clean_differs: int = Field(0, description="images whose clean outcome here differs from "
                               "the earlier report's (another machine's arithmetic)")


class AutoAttackSection(_Model):
    version: str
    attacks: list[str]
    forward: Literal["deterministic", "defended (BPDA gradient)"]
    gradient: str | None = Field(
        None, description="gradient path of its gradient attacks (None: reports written before "
        "the path was recorded, which used the checkpoint's training path)")
    eps: float
    n: int
    accuracy: float
    accuracy_after: dict[str, float] = Field(description="cumulative, in run order")
    correct_after: dict[str, str] | None = Field(
        None, description="per stage of accuracy_after, per image: '1' still right (paired "
        "comparisons); None in reports written before it was recorded")
    seconds: dict[str, float]
    warnings: list[str]
    earlier: EarlierAutoAttack | None = Field(
        None, description="the report whose first stages (outcomes and seconds) this section "
        "took as they were (`--aa-from`); None: every stage ran in this run")


class ScoreResult(_Model):
    auroc: float | None = Field(description="clean test vs successful adversarial inputs "
                                "(None when the attack succeeded nowhere)")
    tpr_at_fpr: float | None = Field(description="threshold set on clean test at settings.fpr")
    auroc_all: float = Field(description="clean test vs every attacked input")
    tpr_at_val_threshold: float | None = None


class Curve(_Model):
    fpr: list[float]
    tpr: list[float]


class DetectionAttack(_Model):
    attack: str
    n_successful: int
    n_all: int
    scores: dict[str, ScoreResult]
    roc: dict[str, Curve] = Field(description="successful adversarial vs clean, <= 101 points")


class Trajectory(_Model):
    label: str
    n: int
    entropy_mean: list[float]
    entropy_q25: list[float]
    entropy_q75: list[float]
    residual_median: list[float]


class DetectionSection(_Model):
    scores: list[str]
    early_index: int
    fpr: float
    attacks: list[DetectionAttack]
    trajectories: list[Trajectory]
    clean_test_fpr_at_val_threshold: float | None = None
    calibration: dict[str, Any] | None = Field(None, description="DetectionCalibration")
    written_to_checkpoint: bool = False
    logistic: dict[str, Any] | None = None


class RiskCoverageCurve(_Model):
    coverage: list[float]
    accuracy: list[float] = Field(description="accuracy among the answered inputs")


class SelectiveScoreResult(_Model):
    """One doubt score on one kind of input; intervals are bootstrap 95% over the inputs."""

    aurc: float = Field(description="area under the risk-coverage curve (lower is better)")
    aurc_ci: list[float] | None = None
    threshold: float = Field(description="clean-validation threshold at the target coverage")
    coverage: float | None = Field(None, description="share answered at that threshold")
    coverage_ci: list[float] | None = None
    accuracy_answered: float | None = Field(None, description="accuracy among the answered "
                                            "(None when none is)")
    accuracy_answered_ci: list[float] | None = None
    successful_answered: float | None = Field(
        None, description="attacked inputs: share of the successful attacks (a correct clean "
        "answer flipped) that are answered, i.e. not caught by abstaining")
    successful_answered_ci: list[float] | None = None
    curve: RiskCoverageCurve = Field(description="<= 101 points, coverage ascending")


class SelectiveKind(_Model):
    kind: str = Field(description="clean, or the attack's name")
    attack: dict[str, Any] | None = None
    n: int
    accuracy: float = Field(description="accuracy answering everything")
    n_successful: int | None = None
    scores: dict[str, SelectiveScoreResult]
    best: str | None = Field(None, description="highest accuracy among the answered at the "
                             "target-coverage threshold (ties: lower AURC)")


class SelectiveSection(_Model):
    scores: list[str]
    target_coverage: float
    n_val: int
    val_accuracy: float
    val_thresholds: dict[str, float] = Field(description="per score, at the target coverage")
    val_realised: dict[str, float] = Field(description="share of validation images answered "
                                           "at that threshold")
    bootstrap_reps: int
    kinds: list[SelectiveKind] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="what was not measured, why")
    calibration: dict[str, Any] | None = Field(None, description="SelectiveCalibration")
    written_to_checkpoint: bool = False


class DefenseSummary(_Model):
    transfer_accuracy: float | None = Field(description="worst case over transfer attacks "
                                            "(the paper's protocol)")
    adaptive_accuracy: float | None = Field(description="worst case over BPDA attacks")
    autoattack_accuracy: float | None
    robust_accuracy: float | None = Field(description="worst case over everything: the honest "
                                          "number")
    overhead_ratio: float


class MergedPart(_Model):
    """One report `deqguard eval-merge` joined: which images it scored, when, and how long."""

    report: str
    start: int
    n: int
    created: str
    seconds_total: float


class EvalReport(_Model):
    schema_version: int = SCHEMA_VERSION
    deqguard_version: str
    created: str
    seconds_total: float
    checkpoint: CheckpointInfo
    settings: EvalSettings
    clean: CleanResult | None = None
    budget: list[BudgetPoint] | None = None
    attacks: list[AttackResult] = Field(default_factory=list)
    worst_case: WorstCase | None = Field(None, description="per-sample worst case over "
                                         "`attacks` and AutoAttack at settings.eps")
    sweeps: Sweeps | None = None
    autoattack: AutoAttackSection | None = None
    defense: DefenseSummary | None = None
    detection: DetectionSection | None = None
    selective: SelectiveSection | None = None
    slowdown: SlowdownSection | None = None
    adaptive_selective: AdaptiveSelectiveSection | None = None
    rectifier: RectifierEvalSection | None = None
    warnings: list[str] = Field(default_factory=list)
    merged_from: list[MergedPart] | None = Field(
        None, description="the reports of consecutive image ranges this one joins "
        "(`deqguard eval-merge`); None for a report one run wrote")
