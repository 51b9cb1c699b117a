"""Projected gradient attacks in the L-infinity ball, shared by adversarial training and evaluation.

`pgd` maximises any per-sample loss of the input; callers choose the loss (cross-entropy for
PGD-AT, KL for TRADES, entropy-aware losses for adaptive attacks) and the gradient path (through
the model function they pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]  # x_adv -> per-sample loss [B] to maximise


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip into the eps-ball around x and into the valid pixel range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd(loss_fn: LossFn, x: Tensor, *, eps: float, step_size: float, steps: int,
        start: Literal["uniform", "normal", "none"] = "uniform",
        generator: torch.Generator | None = None) -> Tensor:
    """Signed-gradient ascent on loss_fn from a random start, projected after every step.

    `start="uniform"` is Madry et al.'s uniform start in the ball; `"normal"` is TRADES'
    x + 0.001 N(0, 1). Returns a detached tensor inside the ball and [0, 1].
    """
    x = x.detach()
    if start == "uniform":
        x_adv = x + _uniform(x, eps, generator)
    elif start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device,
                                        dtype=x.dtype)
    else:
        x_adv = x.clone()
    x_adv = project_linf(x_adv, x, eps)
    for _ in range(steps):
        x_adv = project_linf(x_adv + step_size * _ascent_sign(loss_fn, x_adv), x, eps)
    return x_adv.detach()


def pgd_ce(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float,
           step_size: float, steps: int, generator: torch.Generator | None = None) -> Tensor:
    """Madry PGD: maximise cross-entropy of model_fn(x_adv) against the true labels."""
    return pgd(lambda xa: F.cross_entropy(model_fn(xa), y, reduction="none"), x, eps=eps,
               step_size=step_size, steps=steps, start="uniform", generator=generator)


def fgsm_rs(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float,
            step_size: float, generator: torch.Generator | None = None) -> Tensor:
    """FGSM with a random start (Wong, Rice, Kolter 2020): one-step PGD from a uniform start.

    Returns a detached tensor inside the eps-ball and [0, 1].
    """
    return pgd_ce(model_fn, x, y, eps=eps, step_size=step_size, steps=1, generator=generator)


def n_fgsm(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float,
           step_size: float, noise: float = 2.0,
           generator: torch.Generator | None = None) -> Tensor:
    """N-FGSM (de Jorge et al. 2022): strong noise, one step, no projection to the eps-ball.

    The larger noise (U(-noise eps, noise eps)) instead of clipping is what avoids catastrophic
    overfitting without extra cost. Only the pixel range is enforced, so the example lies within
    noise * eps + step_size of x in L-inf.
    """
    x = x.detach()
    x_start = (x + _uniform(x, noise * eps, generator)).clamp(0.0, 1.0)
    step = _ascent_sign(lambda xa: F.cross_entropy(model_fn(xa), y, reduction="none"), x_start)
    return (x_start + step_size * step).clamp(0.0, 1.0).detach()


def _uniform(x: Tensor, radius: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * noise - 1) * radius


def _ascent_sign(loss_fn: LossFn, x_adv: Tensor) -> Tensor:
    """sign of d/dx sum(loss_fn(x)) at x_adv: the signed-gradient step every attack here takes."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(x_adv).sum(), x_adv)
    return grad.sign()
