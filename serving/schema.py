"""The HTTP wire contract of the deqguard service, shared by the server and the Python client.

Pure pydantic, no torch: the client imports this module. Requests are JSON; images travel as
base64 strings of their encoded bytes (PNG, JPEG, WebP, ...). Errors are answered with a 4xx
status and a JSON body {"error": "<message a user can act on>"}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SolverChoice = Literal["naive", "anderson", "broyden"]
DefenseChoice = Literal["none", "entropy-reduction"]


class ClassifyOptions(BaseModel):
    """Per-request solver budget and extras. Unset fields take the checkpoint's defaults."""

    model_config = ConfigDict(extra="forbid")
    max_iter: int | None = Field(None, ge=1, description="solver iterations, 1 to the server cap")
    tol: float | None = Field(None, gt=0, le=1, description="relative residual to stop at")
    solver: SolverChoice | None = None
    defense: DefenseChoice = "none"
    trajectory: bool = Field(True, description="return per-iteration entropy and residual")
    detect: bool = Field(True, description="apply the checkpoint's attack detector (false: skip "
                         "the dynamics features it needs and answer suspicious=false)")


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
    detection: Detection
    model: ModelRef


class ErrorBody(BaseModel):
    error: str
