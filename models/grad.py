"""Gradient paths through an equilibrium, kept apart from the solvers (as in TorchDEQ).

The solver finds z* without a graph; these functions re-attach a gradient to it. Training,
attacks and serving pick a path over the same forward. With `straight_through=True` the returned
value is z* itself and only the gradient follows the chosen path, so the function an attacker
differentiates is exactly the function that is evaluated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import GradConfig
from .solvers import Fn, get_solver


def phantom_unroll(f: Fn, z: Tensor, steps: int, tau: float) -> Tensor:
    """f(z) followed by `steps` damped steps z <- (1 - tau) z + tau f(z) (paper.md 2.2)."""
    out = f(z)
    for _ in range(steps):
        out = (1 - tau) * out + tau * f(out)
    return out


def _implicit(f: Fn, z_star: Tensor, cfg: GradConfig) -> Tensor:
    """f(z*) whose incoming gradient is replaced by the adjoint g = J^T g + grad (IFT)."""
    fz = f(z_star)
    if not fz.requires_grad:
        return fz
    z_leaf = z_star.detach().requires_grad_()
    with torch.enable_grad():
        f_leaf = f(z_leaf)
    solver = get_solver(cfg.backward_solver)

    def adjoint(grad: Tensor | None) -> Tensor | None:
        if grad is None:  # an undefined incoming gradient stays undefined
            return None

        def vjp_step(y: Tensor) -> Tensor:
            (jt_y,) = torch.autograd.grad(f_leaf, z_leaf, y, retain_graph=True)
            return jt_y + grad

        with torch.no_grad():
            out = solver(vjp_step, torch.zeros_like(grad), max_iter=cfg.backward_max_iter,
                         tol=cfg.backward_tol, stop_mode="rel")
        return out.z

    fz.register_hook(adjoint)
    return fz


def attach_gradient(f: Fn, z_star: Tensor, cfg: GradConfig, *, straight_through: bool) -> Tensor:
    """Return a tensor equal to z* (straight-through) or to the path's output, with its gradient.

    `exact` is not handled here: it needs the solver itself to run under autograd.
    """
    z_star = z_star.detach()
    if straight_through and not torch.is_grad_enabled():
        return z_star
    if cfg.mode == "phantom":
        path = phantom_unroll(f, z_star, cfg.phantom_steps, cfg.phantom_tau)
    elif cfg.mode == "implicit":
        path = _implicit(f, z_star, cfg)
    else:
        raise ValueError(f"gradient mode {cfg.mode!r} is not an attachable path")
    if straight_through:
        return z_star + (path - path.detach())
    return path
