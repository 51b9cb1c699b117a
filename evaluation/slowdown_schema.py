"""The slowdown part's settings and section of the `deqguard eval` JSON (`schema.EvalReport`).

Kept apart from schema.py so the part's fields read in one place; schema.py embeds them.
"""

from __future__ import annotations

from pydantic import Field

from .schema_fields import StrictModel as _Model


class SlowdownSettings(_Model):
    """The slowdown part (`--attacks ...,slowdown`)."""

    solvers: list[str] | None = Field(None, description="solvers attacked, each measured on "
                                      "itself (None: the checkpoint's)")
    k: int | None = Field(None, ge=1, description="iterations whose residual the attack "
                          "raises (None: half the checkpoint's max_iter)")
    steps: int = Field(100, ge=1, description="APGD steps per restart")
    restarts: int = Field(1, ge=1)
    n: int | None = Field(None, ge=1, description="first N test images (None: all n)")
    cap: int = Field(100, ge=1, description="the second budget measured: the server's max_iter "
                     "cap, what a caller may ask for")
    save: str | None = Field(None, description="folder the attacked images were written to "
                             "(npz, and 8-bit PNGs inside the eps-ball)")


class SolveStats(_Model):
    """One set of inputs solved one image at a time at one budget."""

    mean_iterations: float
    p90_iterations: float
    max_iterations: int
    converged_fraction: float = Field(description="residual under the checkpoint's tol")
    ms_per_answer: float = Field(description="wall time of a one-image solve, mean")
    accuracy: float


class SlowdownBudget(_Model):
    max_iter: int
    is_default: bool = Field(description="the checkpoint's max_iter (what a plain request runs)")
    clean: SolveStats
    attacked: SolveStats
    ms_ratio: float = Field(description="attacked / clean ms_per_answer, timed interleaved")
    iterations_ratio: float = Field(description="attacked / clean mean_iterations")


class SlowdownResult(_Model):
    solver: str
    k: int
    steps: int
    restarts: int
    eps: float
    n: int
    residual_clean_median: float = Field(description="relative residual after k iterations")
    residual_attacked_median: float
    residual_raised_fraction: float = Field(description="share of images whose residual after "
                                            "k the attack raised")
    seconds: float = Field(description="crafting time")
    resumed: bool = Field(False, description="the attacked images were read from the save "
                          "folder, crafted by an earlier run with the same settings")
    budgets: list[SlowdownBudget]


class SlowdownSection(_Model):
    tol: float = Field(description="the checkpoint's tol, the stop the attack works against")
    default_max_iter: int
    results: list[SlowdownResult]
    note: str = Field(description="how the numbers were measured")
