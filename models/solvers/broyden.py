"""Limited-memory Broyden's method on g(z) = f(z) - z (the DEQ papers' forward solver).

The inverse Jacobian estimate is -I + U V^T with one rank-one term per step (good Broyden
update), kept per sample and capped at `broyden_memory` terms. Without line search, as in
paper.md 2.2. Histories are lists so the solve stays differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Fn, IterateHook, SolverOutput, StepRecorder


def _matvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
    """(-I + U V^T) x, per sample; x is [B, D]."""
    if not us:
        return -x
    u = torch.stack(us, dim=2)  # [B, D, k]
    v = torch.stack(vs, dim=1)  # [B, k, D]
    return -x + torch.bmm(u, torch.bmm(v, x.unsqueeze(2))).squeeze(2)


def _rmatvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
    """x^T (-I + U V^T), per sample."""
    if not us:
        return -x
    u = torch.stack(us, dim=2)
    v = torch.stack(vs, dim=1)
    return -x + torch.bmm(torch.bmm(x.unsqueeze(1), u), v).squeeze(1)


def broyden_solve(f: Fn, z0: Tensor, *, max_iter: int, tol: float = 1e-3, stop_mode: str = "rel",
                  broyden_memory: int = 30, on_iterate: IterateHook | None = None,
                  keep_states: bool = False, **_: object) -> SolverOutput:
    """Quasi-Newton root finding of f(z) - z with per-sample low-rank inverse-Jacobian updates."""
    rec = StepRecorder(z0, max_iter, tol, stop_mode, on_iterate, keep_states)
    b = z0.shape[0]
    us: list[Tensor] = []
    vs: list[Tensor] = []
    z = z0
    x_prev: Tensor | None = None
    g_prev: Tensor | None = None
    while not rec.finished:
        fz = f(z)
        done = rec.check(fz, z)
        x = z.reshape(b, -1)
        g = fz.reshape(b, -1) - x
        if x_prev is not None:
            dx, dg = x - x_prev, g - g_prev
            v_t = _rmatvec(us, vs, dx)
            denom = (v_t * dg).sum(dim=1, keepdim=True)
            # Samples that did not move (frozen or stalled) get a null update instead of 0/0.
            safe = denom.abs() > 1e-12
            u = (dx - _matvec(us, vs, dg)) / torch.where(safe, denom, torch.ones_like(denom))
            u = torch.where(safe, u, torch.zeros_like(u))
            v_t = torch.where(safe, v_t, torch.zeros_like(v_t))
            us, vs = (us + [u])[-broyden_memory:], (vs + [v_t])[-broyden_memory:]
        update = -_matvec(us, vs, g)
        x_prev, g_prev = x, g
        z_next = torch.nan_to_num(x + update).view_as(z)
        z = rec.commit(z_next, z, done, fz)
    return rec.output(z)
