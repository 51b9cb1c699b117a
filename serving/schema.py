"""The HTTP wire contract of the deqguard service, shared by the server and the Python client.

Pure pydantic, no torch: the client imports this module. Requests are JSON; images travel as
base64 strings of their encoded bytes (PNG, JPEG, WebP, ...). POST /classify also takes the
image as an upload (multipart/form-data, file field `image`, options as form fields) or as the raw
body (Content-Type image/*, options as query parameters): serving/uploads.py turns both into this
same JSON request, so every rule below applies to them too. Errors are answered with a 4xx
status and a JSON body {"error": "<message a user can act on>"}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deqguard.solve_rules import (
    COVERAGE_LOW,
    DEFENSES,
    FULL_COVERAGE,
    MAX_ITER_BOUND,
    SOLVERS,
    STOP_REASONS,
)

SolverChoice = Literal[SOLVERS]
StopReason = Literal[STOP_REASONS]
DefenseChoice = Literal[DEFENSES]


class ClassifyOptions(BaseModel):
    """Per-request solver budget and extras. Unset fields take the checkpoint's defaults."""

    model_config = ConfigDict(extra="forbid")
    max_iter: int | None = Field(None, ge=1, description="solver iterations, 1 to the server cap")
    tol: float | None = Field(None, gt=0, le=1, description="relative residual to stop at")
    solver: SolverChoice | None = None
    defense: DefenseChoice = "none"
    trajectory: bool = Field(True, description="return per-iteration entropy and residual")
    deadline_ms: int | None = Field(
        None, ge=1, le=600_000,
        description="anytime: answer with the current iterate once this many ms have passed "
                    "since the request arrived (stopped='deadline'; torch backend only). A "
                    "server with a compute budget (request_budget_ms, GET /model) stops "
                    "every request at that budget, the earlier of the two")
    settle_iters: int | None = Field(
        None, ge=0, le=MAX_ITER_BOUND,
        description="anytime: stop once the top-1 class is unchanged over this many iterates "
                    "and the entropy is under settle_entropy (stopped='settled'); 0 turns it "
                    "off; default: the server's (GET /model, serving.defaults). Not applied "
                    "while a calibrated detector reads the dynamics (detect=true): it was "
                    "fitted on full solves")
    settle_entropy: float | None = Field(
        None, gt=0, description="anytime: entropy threshold (nats) of the settled exit")
    detect: bool = Field(True, description="apply the checkpoint's attack detector (false: skip "
                         "the dynamics features it needs and answer suspicious=false)")
    coverage: float = Field(
        FULL_COVERAGE, gt=COVERAGE_LOW, le=FULL_COVERAGE, allow_inf_nan=False,
        description="selective answering: the share of clean inputs the service should answer, "
                    "0 < coverage <= 1 (1: always answer). Below 1 the answer says "
                    "abstained=true, prediction still given, when its doubt score is over the "
                    "threshold calibrated for this coverage on clean validation images "
                    "(checkpoint metadata 'selective', GET /model); refused (422) on a "
                    "checkpoint without that calibration, and an invalid value is a 422")


# The options a solve reads (the engine resolves them); `trajectory` only shapes the answer.
SOLVE_OPTION_FIELDS: tuple[str, ...] = tuple(f for f in ClassifyOptions.model_fields
                                             if f != "trajectory")
# Fields whose invalid values are answered 422, not 400: the request is well formed but asks for
# what the service cannot honour, and a client must be able to tell the two apart.
UNPROCESSABLE_FIELDS = frozenset({"coverage"})


class ClassifyRequest(ClassifyOptions):
    """POST /classify: one encoded image, base64."""

    image: str = Field(description="base64 of the encoded image bytes (PNG, JPEG, WebP, ...)")


class ClassifyBatchRequest(ClassifyOptions):
    """POST /classify_batch: several encoded images; answers come back in the same order."""

    images: list[str]


class ClassifyTensorRequest(ClassifyOptions):
    """POST /classify_tensor: float32 values in [0, 1], nested lists of shape [N, C, H, W]."""

    tensor: list


class Detection(BaseModel):
    """Attack-detection signal (threshold null until calibrated).

    `detector` names what produced it: "dynamics-logistic" (the learned detector over the
    solve's dynamics features, metadata["detector"]), "calibration" (the single-score
    calibration, metadata["detection"]), "uncalibrated", or "off" (the request said detect=false).
    `fpr` is the false-positive rate the threshold was calibrated at on clean validation images.
    """

    score_name: str | None = None
    score: float
    threshold: float | None = None
    suspicious: bool = False
    detector: str | None = None
    fpr: float | None = None


class Selective(BaseModel):
    """How the answer was judged for abstention (coverage < 1).

    `score` is the checkpoint's doubt score for this input (higher = less sure; null when the
    checkpoint has no selective calibration, or its score could not be computed for this
    request); `threshold` the one calibrated for the requested `coverage` (null at coverage 1:
    everything is answered). abstained = score > threshold. Below coverage 1 the solve runs in
    full (no settled exit, as calibrated); at coverage 1 the settled exit may end it earlier,
    so the score shown there can differ from the one a lower coverage judges.
    """

    coverage: float = FULL_COVERAGE
    score_name: str | None = None
    score: float | None = None
    threshold: float | None = None


class ModelRef(BaseModel):
    name: str
    sha256: str


class ClassifyResult(BaseModel):
    label: int
    class_name: str
    probabilities: list[float]
    entropy: list[float] = Field(description="entropy (nats) of the prediction at each iterate")
    residual: list[float] = Field(description="relative fixed-point residual at each iterate")
    iterations: int
    converged: bool
    stopped: StopReason | None = Field(
        None, description="why the solve stopped: tol (converged), settled (anytime exit), "
                          "deadline (the request's deadline_ms), budget (the server's "
                          "per-request compute budget; a selective answer then abstains), or "
                          "max_iter (null only from servers older than this field)")
    detection: Detection
    abstained: bool = Field(
        False, description="true when the doubt score is over the threshold of the requested "
                           "coverage, or the server's compute budget cut the solve "
                           "(stopped='budget'): the service would rather not answer (the "
                           "prediction is still given); always false at coverage 1")
    selective: Selective | None = Field(
        None, description="score and threshold behind `abstained` (null only from servers "
                          "older than this field)")
    model: ModelRef
