"""Typed configuration shared by every deqguard model.

Every knob that changes what a checkpoint computes lives in a config, so that it can be written
into the checkpoint's metadata and rebuilt exactly. This module holds the pieces all
architectures share: the solver and gradient settings and the two base classes. Each
architecture's own config sits beside its network (models/tiny.py, models/mdeq.py, ...) and is
registered with it (models/registry.py). Pydantic gives JSON round trips and clear validation
errors for free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from deqguard.solve_rules import MAX_ITER_BOUND, SOLVERS

SolverName = Literal[SOLVERS]
GradMode = Literal["phantom", "implicit", "exact"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SolverConfig(_Strict):
    """Forward fixed-point solver defaults; every one can be overridden per call."""

    solver: SolverName = "anderson"
    max_iter: int = Field(30, ge=1, le=MAX_ITER_BOUND)
    tol: float = Field(1e-3, gt=0)
    stop_mode: Literal["rel", "abs"] = "rel"
    damping: float = Field(1.0, gt=0, le=1.0, description="naive iteration: z <- (1-d) z + d f(z)")
    anderson_m: int = Field(5, ge=1, le=50)
    anderson_lam: float = Field(1e-4, ge=0)
    broyden_memory: int = Field(30, ge=1, le=1000)


class GradConfig(_Strict):
    """How gradients flow back through the equilibrium (paper.md 2.2).

    `phantom`: f(z*) then `phantom_steps` damped steps z <- (1-tau) z + tau f(z) (the paper's
    training gradient). `implicit`: implicit-function-theorem adjoint solved by
    `backward_solver`. `exact`: backprop through every solver iteration (attacks, checks).
    """

    mode: GradMode = "phantom"
    phantom_steps: int = Field(5, ge=0, le=100)
    phantom_tau: float = Field(0.5, gt=0, le=1.0)
    backward_solver: SolverName = "anderson"
    backward_max_iter: int = Field(40, ge=1, le=1000)
    backward_tol: float = Field(1e-6, gt=0)


class ModelConfig(_Strict):
    """Base of every architecture's config: the data shape, and `arch`, the registered name
    that checkpoint metadata stores and the registry rebuilds the network from.

    A subclass narrows `arch` to `Literal["its-name"] = "its-name"`; `register_model` checks
    that the name it is given is that one.
    """

    num_classes: int = Field(10, ge=2)
    in_channels: int = Field(1, ge=1)
    image_size: int = Field(28, ge=8)
    arch: str


class RectifierConfig(_Strict):
    """A rectified-rejection head (Pang et al., CVPR 2022): a scalar A read off the equilibrium.

    The served doubt is 1 - max p x sigmoid(A) (models/rectifier.py). The head sees the
    flattened state z* and, when `trajectory` > 0, the entropy and log10 relative residual of
    the first `trajectory` iterates: how the DEQ got there, not only where it ended.
    """

    hidden: int = Field(64, ge=1)
    trajectory: int = Field(0, ge=0, le=100, description="iterates whose entropy and residual "
                            "the head reads (0: the state only)")


class DEQConfig(ModelConfig):
    """Base of the equilibrium models' configs: how they solve and how gradients flow back.

    `rectifier` adds a trained doubt head; None (every checkpoint written without one) builds
    exactly the network it did before.
    """

    solver: SolverConfig = SolverConfig()
    grad: GradConfig = GradConfig()
    rectifier: RectifierConfig | None = None

    @model_serializer(mode="wrap")
    def _without_absent_head(self, handler: Any) -> Any:
        """A network without a head writes the config it wrote before the head existed: its
        stored config parses to itself, and older readers (extra fields forbidden) still load it."""
        data = handler(self)
        if self.rectifier is None and isinstance(data, dict):
            data.pop("rectifier", None)
        return data
