"""Small building blocks shared by the DEQ architectures."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)


def maybe_weight_norm(conv: nn.Conv2d, enabled: bool) -> nn.Module:
    """Weight norm keeps the DEQ layer's scale controllable, which helps it stay contractive."""
    return weight_norm(conv) if enabled else conv


class VariationalDropout2d(nn.Module):
    """Dropout whose mask is drawn once per solve and reused at every iteration.

    A fresh mask at each iteration would change f between iterations, and the solver would chase a
    moving fixed point. `reset()` is called by the model at the start of every solve.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: Tensor | None = None

    def reset(self) -> None:
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            keep = 1.0 - self.p
            self.mask = torch.bernoulli(torch.full_like(x, keep)).div_(keep)
        return x * self.mask


class ResidualCell(nn.Module):
    """MDEQ's residual block f(z, u): conv-GN-ReLU-drop-conv(+u)-GN, + z, ReLU, GN.

    The final GroupNorm bounds the state, which keeps the iteration well behaved.
    """

    def __init__(self, channels: int, expansion: int, groups: int, dropout: float, wn: bool):
        super().__init__()
        inner = channels * expansion
        self.conv1 = maybe_weight_norm(conv3x3(channels, inner), wn)
        self.gn1 = nn.GroupNorm(groups, inner)
        self.drop = VariationalDropout2d(dropout)
        self.conv2 = maybe_weight_norm(conv3x3(inner, channels), wn)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)

    def forward(self, z: Tensor, injection: Tensor | None) -> Tensor:
        y = self.drop(torch.relu(self.gn1(self.conv1(z))))
        y = self.conv2(y)
        if injection is not None:
            y = y + injection
        y = self.gn2(y)
        return self.gn3(torch.relu(y + z))
