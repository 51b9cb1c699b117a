"""Single-scale DEQ small enough to adversarially train on two CPU cores.

A strided stem brings the image to a quarter of its size, so that each of the many solver
iterations (times attack steps) stays cheap; one MDEQ-style residual block is iterated there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from .classifier import StemCellDEQ
from .config import DEQConfig
from .layers import ResidualCell, conv1x1, conv3x3
from .registry import register_model


class TinyDEQConfig(DEQConfig):
    """Single-scale DEQ: a strided stem injects the image, one residual block is iterated."""

    arch: Literal["tiny-deq"] = "tiny-deq"
    width: int = Field(32, ge=4)
    expansion: int = Field(2, ge=1)
    stem_stride: Literal[1, 2, 4] = 4
    num_groups: int = Field(4, ge=1)
    head_width: int = Field(128, ge=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_norm: bool = True


def _stem(cfg: TinyDEQConfig) -> nn.Sequential:
    w, g = cfg.width, cfg.num_groups
    half = max(w // 2, g)
    strides = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[cfg.stem_stride]
    return nn.Sequential(
        conv3x3(cfg.in_channels, half), nn.GroupNorm(g, half), nn.ReLU(),
        conv3x3(half, w, stride=strides[0]), nn.GroupNorm(g, w), nn.ReLU(),
        conv3x3(w, w, stride=strides[1]), nn.GroupNorm(g, w),
    )


@register_model("tiny-deq", TinyDEQConfig, presets={"tiny": TinyDEQConfig()})
class TinyDEQ(StemCellDEQ):
    def __init__(self, config: TinyDEQConfig):
        super().__init__(config)
        c = config
        self.stem = _stem(c)
        self.cell = ResidualCell(c.width, c.expansion, c.num_groups, c.dropout, c.weight_norm)
        self.head = nn.Sequential(
            conv1x1(c.width, c.head_width), nn.GroupNorm(c.num_groups, c.head_width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c.head_width, c.num_classes),
        )
