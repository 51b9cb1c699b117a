"""Typed configuration for deqguard models.

Every knob that changes what a checkpoint computes lives here, so that it can be written into the
checkpoint's metadata and rebuilt exactly by `build_model`. Pydantic gives JSON round trips and
clear validation errors for free.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

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


class _ClassifierBase(_Strict):
    num_classes: int = Field(10, ge=2)
    in_channels: int = Field(1, ge=1)
    image_size: int = Field(28, ge=8)


class TinyDEQConfig(_ClassifierBase):
    """Single-scale DEQ: a strided stem injects the image, one residual block is iterated."""

    arch: Literal["tiny-deq"] = "tiny-deq"
    width: int = Field(32, ge=4)
    expansion: int = Field(2, ge=1)
    stem_stride: Literal[1, 2, 4] = 4
    num_groups: int = Field(4, ge=1)
    head_width: int = Field(128, ge=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_norm: bool = True
    solver: SolverConfig = SolverConfig()
    grad: GradConfig = GradConfig()


class MDEQConfig(_ClassifierBase):
    """Multiscale DEQ (MDEQ); defaults are the paper's DEQ-Large (paper.md 2.1)."""

    arch: Literal["mdeq"] = "mdeq"
    in_channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=8)
    channels: tuple[int, ...] = (32, 64, 128, 256)
    expansion: int = Field(5, ge=1)
    num_groups: int = Field(8, ge=1)
    head_channels: tuple[int, ...] = (14, 28, 56, 112)
    final_channels: int = Field(1680, ge=8)
    dropout: float = Field(0.22, ge=0, lt=1)
    weight_norm: bool = True
    solver: SolverConfig = SolverConfig(solver="broyden", max_iter=8)
    grad: GradConfig = GradConfig()

    @model_validator(mode="after")
    def _branches_fit(self) -> MDEQConfig:
        # Nearest upsampling between branches only lines up when every halving is exact.
        k = 2 ** (len(self.channels) - 1)
        if self.image_size % k:
            raise ValueError(f"image_size {self.image_size} must be divisible by {k} for "
                             f"{len(self.channels)} branches")
        if len(self.head_channels) != len(self.channels):
            raise ValueError("head_channels needs one entry per branch in channels")
        return self


class CNNConfig(_ClassifierBase):
    """Feedforward baseline of about the tiny DEQ's parameter count."""

    arch: Literal["cnn"] = "cnn"
    widths: tuple[int, ...] = (32, 64, 64)
    head_width: int = Field(128, ge=4)


class AnchorCNNConfig(_ClassifierBase):
    """The anchor paper's CNN (Croce, Andriushchenko, Hein, AISTATS 2019, Table 1; Wong and
    Kolter's "small"): conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10. 166,406 parameters on
    28x28x1: the baseline every Fashion-MNIST DEQ here has to beat at equal cost."""

    arch: Literal["cnn-wk"] = "cnn-wk"
    channels: tuple[int, int] = (16, 32)
    hidden: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _halves_twice(self) -> AnchorCNNConfig:
        _check_quartered(self.image_size)
        return self


class AnchorDEQConfig(_ClassifierBase):
    """A DEQ at the anchor CNN's cost: the anchor's two strided convolutions inject the image
    into a state of size/4 x size/4 x channels[-1] (7x7x32 on Fashion-MNIST), one residual cell
    is iterated there, and the anchor's fc head (`head="fc"`) or a pooled linear one decodes it.
    """

    arch: Literal["deq-wk"] = "deq-wk"
    channels: tuple[int, int] = (16, 32)
    expansion: int = Field(1, ge=1)
    num_groups: int = Field(4, ge=1)
    head: Literal["fc", "pool"] = "fc"
    hidden: int = Field(100, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_norm: bool = True
    solver: SolverConfig = SolverConfig()
    grad: GradConfig = GradConfig()

    @model_validator(mode="after")
    def _halves_twice(self) -> AnchorDEQConfig:
        _check_quartered(self.image_size)
        return self


def _check_quartered(image_size: int) -> None:
    # two 4x4 stride-2 convolutions with padding 1 halve exactly only an even size, twice
    if image_size % 4:
        raise ValueError(f"image_size {image_size} must be divisible by 4 for the anchor's stem")


class ResNetConfig(_ClassifierBase):
    """torchvision ResNet-18 with a CIFAR stem (3x3 conv, no max-pool): the paper's baseline."""

    arch: Literal["resnet18"] = "resnet18"
    in_channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=8)


ModelConfig = Annotated[
    TinyDEQConfig | MDEQConfig | AnchorDEQConfig | CNNConfig | AnchorCNNConfig | ResNetConfig,
    Field(discriminator="arch"),
]
DEQConfig = TinyDEQConfig | MDEQConfig | AnchorDEQConfig

_MODEL_CONFIG_ADAPTER: TypeAdapter = TypeAdapter(ModelConfig)


def parse_model_config(data: dict | str) -> (TinyDEQConfig | MDEQConfig | AnchorDEQConfig
                                              | CNNConfig | AnchorCNNConfig | ResNetConfig):
    """Rebuild a model config from its JSON form (as stored in checkpoint metadata)."""
    if isinstance(data, str):
        return _MODEL_CONFIG_ADAPTER.validate_json(data)
    return _MODEL_CONFIG_ADAPTER.validate_python(data)


PRESETS: dict[str, ModelConfig] = {
    "tiny": TinyDEQConfig(),
    "large": MDEQConfig(),
    "xl": MDEQConfig(channels=(72, 144, 288, 576), head_channels=(20, 40, 80, 160),
                     final_channels=1800),
    "cnn": CNNConfig(),
    "cnn-wk": AnchorCNNConfig(),
    "deq-wk": AnchorDEQConfig(),
    "resnet18": ResNetConfig(),
}
