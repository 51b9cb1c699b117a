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
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + (2 * noise - 1) * eps
    elif start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device,
                                        dtype=x.dtype)
    else:
        x_adv = x.clone()
    x_adv = project_linf(x_adv, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def pgd_ce(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float,
           step_size: float, steps: int, generator: torch.Generator | None = None) -> Tensor:
    """Madry PGD: maximise cross-entropy of model_fn(x_adv) against the true labels."""
    return pgd(lambda xa: F.cross_entropy(model_fn(xa), y, reduction="none"), x, eps=eps,
               step_size=step_size, steps=steps, start="uniform", generator=generator)


def _ce_grad_sign(model_fn: Callable[[Tensor], Tensor], x_start: Tensor, y: Tensor) -> Tensor:
    x_start = x_start.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model_fn(x_start), y, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, x_start)
    return grad.sign()


def _uniform(x: Tensor, radius: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * noise - 1) * radius


def fgsm_rs(model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float,
            step_size: float, generator: torch.Generator | None = None) -> Tensor:
    """FGSM with a random start (Wong, Rice, Kolter 2020): one step, projected to the ball.

    Returns a detached tensor inside the eps-ball and [0, 1].
    """
    x = x.detach()
    x_start = project_linf(x + _uniform(x, eps, generator), x, eps)
    return project_linf(x_start + step_size * _ce_grad_sign(model_fn, x_start, y), x, eps)


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
    x_adv = x_start + step_size * _ce_grad_sign(model_fn, x_start, y)
    return x_adv.clamp(0.0, 1.0).detach()
