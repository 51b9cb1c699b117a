"""Slowdown attacks on a DEQ: inputs within the eps-ball that keep the solver from converging.

A DEQ's cost per answer is the number of solver iterations its input needs, so an attacker who
wants to stall a service looks for inputs whose fixed-point iteration converges slowly. The
attack maximises log ||f(z_k) - z_k|| / ||f(z_k)||, the relative residual of the k-th iterate,
through the exact unrolled graph of the solver the service runs (Anderson's mixing included),
with no early stop: a sample whose residual is still large after k steps is one the served
`tol` will not stop before k. The log keeps samples at very different residuals comparable in
the step-size schedule. The optimiser is APGD's (Croce & Hein, 2020): signed-gradient steps
with momentum and a per-sample step size halved, with a restart from the best point, whenever
the loss stops rising; it maximises any per-sample loss, not only this one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deqguard.models.classifier import DEQClassifier
from deqguard.models.solvers import residual
from deqguard.training.attacks import project_linf

LossFn = Callable[[Tensor], Tensor]  # x -> per-sample loss [B] to maximise


def residual_after(model: DEQClassifier, x: Tensor, k: int, solver: str | None = None) -> Tensor:
    """[B] relative residual of the k-th iterate of `solver` (no early stop), with the exact
    gradient through every iteration when grad is enabled."""
    eq = model.equilibrium(x, solver=solver, max_iter=k, tol=0.0, grad="exact")
    return residual(eq.f(eq.z), eq.z, "rel")


def slowdown_loss(model: DEQClassifier, k: int, solver: str | None = None) -> LossFn:
    """x -> log residual after k iterations: the slowdown attack's objective."""
    return lambda x: residual_after(model, x, k, solver).clamp_min(1e-30).log()


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations where APGD checks its progress: p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as steps."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({int(round(q * steps)) for q in p[1:] if 0 < round(q * steps) < steps})


def apgd_maximise(loss_fn: LossFn, x: Tensor, *, eps: float, steps: int, restarts: int = 1,
                  rho: float = 0.75, momentum: float = 0.75,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x_best, loss_best): the highest-loss point per sample seen over `restarts` APGD runs of
    `steps` signed-gradient steps each, from uniform random starts in the eps-ball.

    At each checkpoint a sample's step size is halved, and it restarts from its best point,
    when at most `rho` of the steps since the last checkpoint raised its loss, or when its
    step size was not halved last time and its best loss has not improved since.
    """
    x = x.detach()
    best_x, best_loss = x.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    for _ in range(max(restarts, 1)):
        cand_x, cand_loss = _apgd_run(loss_fn, x, eps, steps, rho, momentum, generator)
        better = cand_loss > best_loss
        best_x[better], best_loss[better] = cand_x[better], cand_loss[better]
    return best_x, best_loss


def _loss_grad(loss_fn: LossFn, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x_adv)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), grad.detach().clone()  # a sum's gradient may be a broadcast view


def _apgd_run(loss_fn: LossFn, x: Tensor, eps: float, steps: int, rho: float, momentum: float,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    b = len(x)
    shape = (b,) + (1,) * (x.dim() - 1)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = project_linf(x + (2 * noise - 1) * eps, x, eps)
    loss, grad = _loss_grad(loss_fn, x_adv)
    best_x, best_loss, best_grad = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full(shape, 2.0 * eps, device=x.device, dtype=x.dtype)
    x_prev = x_adv.clone()
    checks = set(apgd_checkpoints(steps))
    last_check = 0
    rises = torch.zeros(b, device=x.device)
    best_at_check = best_loss.clone()
    halved_last = torch.ones(b, dtype=torch.bool, device=x.device)
    for i in range(steps):
        a = momentum if i > 0 else 1.0
        z = project_linf(x_adv + step * grad.sign(), x, eps)
        x_new = project_linf(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
        x_prev, x_adv = x_adv, x_new
        new_loss, grad = _loss_grad(loss_fn, x_adv)
        rises += (new_loss > loss).float()
        loss = new_loss
        better = loss > best_loss
        best_x[better], best_loss[better], best_grad[better] = (
            x_adv[better], loss[better], grad[better])
        if i + 1 in checks:
            too_few = rises <= rho * (i + 1 - last_check)
            stuck = ~halved_last & (best_loss <= best_at_check)
            halve = too_few | stuck
            step[halve] /= 2
            x_adv[halve], grad[halve] = best_x[halve], best_grad[halve]
            x_prev[halve] = best_x[halve]
            halved_last, best_at_check = halve, best_loss.clone()
            rises.zero_()
            last_check = i + 1
    return best_x, best_loss


def slowdown_attack(model: DEQClassifier, x: Tensor, *, eps: float, k: int, steps: int,
                    solver: str | None = None, restarts: int = 1, batch_size: int = 128,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x_adv, log residual after k) per sample: APGD on the slowdown loss, batch by batch."""
    loss = slowdown_loss(model, k, solver)
    xs, ls = [], []
    for lo in range(0, len(x), batch_size):
        xa, la = apgd_maximise(loss, x[lo:lo + batch_size], eps=eps, steps=steps,
                               restarts=restarts, generator=generator)
        xs.append(xa)
        ls.append(la)
    return torch.cat(xs), torch.cat(ls)


def quantize_in_ball(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """x_adv as 8-bit pixels (uint8, what a PNG holds) kept inside the eps-ball around x: each
    pixel rounds to the nearest level within [x - eps, x + eps] and [0, 1]."""
    lo = torch.ceil((x - eps).clamp(0, 1) * 255)
    hi = torch.floor((x + eps).clamp(0, 1) * 255)
    q = torch.round(x_adv * 255)
    return torch.max(torch.min(q, hi), lo).to(torch.uint8)
