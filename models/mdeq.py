"""Multiscale DEQ (MDEQ-Large of the paper, paper.md 2.1).

Four resolution branches are solved jointly; the solver sees them packed into one flat state
[B, D], and this module packs and unpacks them. The image is injected into the
highest-resolution branch only; the head is HRNet-style.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .classifier import DEQClassifier
from .config import DEQConfig, SolverConfig
from .layers import ResidualCell, conv1x1, conv3x3, maybe_weight_norm
from .registry import register_model


class MDEQConfig(DEQConfig):
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


# `large` is the paper's DEQ-Large; `xl` the same four branches with 2.25x their channels.
_PRESETS = {
    "large": MDEQConfig(),
    "xl": MDEQConfig(channels=(72, 144, 288, 576), head_channels=(20, 40, 80, 160),
                     final_channels=1800),
}


def _bn_relu(conv: nn.Module, ch: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(ch), nn.ReLU()]


def _fuse_op(cin: int, cout: int, level_diff: int, groups: int) -> nn.Module:
    """Bring branch j to branch i's resolution: upsample (level_diff < 0) or stride down."""
    if level_diff < 0:
        return nn.Sequential(conv1x1(cin, cout), nn.GroupNorm(groups, cout),
                             nn.Upsample(scale_factor=2 ** (-level_diff), mode="nearest"))
    layers: list[nn.Module] = []
    ch = cin
    for k in range(level_diff):
        last = k == level_diff - 1
        nxt = cout if last else ch
        layers += [conv3x3(ch, nxt, stride=2), nn.GroupNorm(groups, nxt)]
        if not last:
            layers.append(nn.ReLU())
        ch = nxt
    return nn.Sequential(*layers)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            *_bn_relu(conv1x1(cin, planes), planes), *_bn_relu(conv3x3(planes, planes), planes),
            conv1x1(planes, out), nn.BatchNorm2d(out))
        self.shortcut = nn.Sequential(conv1x1(cin, out), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


@register_model("mdeq", MDEQConfig, presets=_PRESETS)
class MDEQ(DEQClassifier):
    def __init__(self, config: MDEQConfig):
        super().__init__(config)
        c = config
        ch, g = list(c.channels), c.num_groups
        self.shapes = [(ch[i], c.image_size // 2 ** i, c.image_size // 2 ** i)
                       for i in range(len(ch))]
        self.stem = nn.Sequential(
            *_bn_relu(conv3x3(c.in_channels, ch[0]), ch[0]),
            *_bn_relu(conv3x3(ch[0], ch[0]), ch[0]),
            *_bn_relu(conv1x1(ch[0], ch[0]), ch[0]))
        self.branches = nn.ModuleList(
            ResidualCell(ci, c.expansion, g, c.dropout, c.weight_norm) for ci in ch)
        self.fuse = nn.ModuleList(
            nn.ModuleList(nn.Identity() if i == j else _fuse_op(ch[j], ch[i], i - j, g)
                          for j in range(len(ch)))
            for i in range(len(ch)))
        self.post_fuse = nn.ModuleList(
            nn.Sequential(nn.ReLU(), maybe_weight_norm(conv1x1(ci, ci), c.weight_norm),
                          nn.GroupNorm(max(g // 2, 1), ci, affine=False))
            for ci in ch)
        hc = list(c.head_channels)
        self.incre = nn.ModuleList(_Bottleneck(ci, h) for ci, h in zip(ch, hc, strict=True))
        self.downsamp = nn.ModuleList(
            nn.Sequential(*_bn_relu(conv3x3(hc[i] * 4, hc[i + 1] * 4, stride=2, bias=True),
                                    hc[i + 1] * 4))
            for i in range(len(hc) - 1))
        self.final = nn.Sequential(*_bn_relu(conv1x1(hc[-1] * 4, c.final_channels, bias=True),
                                             c.final_channels))
        self.classifier = nn.Linear(c.final_channels, c.num_classes)

    # packing the branches into the solver's flat state
    def _unpack(self, z: Tensor) -> list[Tensor]:
        sizes = [c * h * w for c, h, w in self.shapes]
        parts = torch.split(z, sizes, dim=1)
        return [p.reshape(z.shape[0], *s) for p, s in zip(parts, self.shapes, strict=True)]

    @staticmethod
    def _pack(zs: list[Tensor]) -> Tensor:
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    def inject(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def initial_state(self, u: Tensor) -> Tensor:
        d = sum(c * h * w for c, h, w in self.shapes)
        return u.new_zeros(u.shape[0], d)

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        zs = self._unpack(z)
        blocks = [cell(zi, u if i == 0 else None)
                  for i, (cell, zi) in enumerate(zip(self.branches, zs, strict=True))]
        fused = []
        for i, ops in enumerate(self.fuse):
            y = blocks[i]
            for j, op in enumerate(ops):
                if j != i:
                    y = y + op(blocks[j])
            fused.append(self.post_fuse[i](y))
        return self._pack(fused)

    def decode(self, z: Tensor) -> Tensor:
        zs = self._unpack(z)
        y = self.incre[0](zs[0])
        for i, down in enumerate(self.downsamp):
            y = self.incre[i + 1](zs[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
