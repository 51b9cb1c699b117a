"""Small building blocks shared by the DEQ architectures."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
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

    def functional(self) -> Callable[[Tensor, Tensor | None], Tensor]:
        """`forward` as a closure over the weights as they are now, for a solver's inner loop.

        The same kernels in the same order as `forward` (bit for bit), without the module calls
        and the weight-norm recomputation (or cache lookup) of every step: at batch 1 those
        cost about as much as the convolutions. Take it inside `parametrize.cached()` or under
        the grad mode the weights' graph should have, as `forward` would see them.
        """
        c1, c2 = self.conv1, self.conv2
        if c1.padding_mode != "zeros" or c2.padding_mode != "zeros":
            return self.forward
        w1, b1, w2, b2 = c1.weight, c1.bias, c2.weight, c2.bias
        norms = [(gn.num_groups, gn.weight, gn.bias, gn.eps)
                 for gn in (self.gn1, self.gn2, self.gn3)]
        (g1, gn1_w, gn1_b, e1), (g2, gn2_w, gn2_b, e2), (g3, gn3_w, gn3_b, e3) = norms
        drop = self.drop if self.training and self.drop.p > 0 else None
        # torch.group_norm is the kernel F.group_norm calls after its Python-side checks (a
        # third of the norm's time at batch 2); the state's shape is checked by the caller
        group_norm = torch.group_norm
        cudnn = torch.backends.cudnn.enabled

        def step(z: Tensor, injection: Tensor | None) -> Tensor:
            y = F.conv2d(z, w1, b1, c1.stride, c1.padding, c1.dilation, c1.groups)
            y = torch.relu(group_norm(y, g1, gn1_w, gn1_b, e1, cudnn))
            if drop is not None:
                y = drop(y)
            y = F.conv2d(y, w2, b2, c2.stride, c2.padding, c2.dilation, c2.groups)
            if injection is not None:
                y = y + injection
            y = group_norm(y, g2, gn2_w, gn2_b, e2, cudnn)
            return group_norm(torch.relu(y + z), g3, gn3_w, gn3_b, e3, cudnn)

        return step
