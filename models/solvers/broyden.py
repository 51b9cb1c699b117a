"""Limited-memory Broyden's method on g(z) = f(z) - z (the DEQ papers' forward solver).

The inverse Jacobian estimate is -I + sum_i u_i v_i^T with one rank-one term per step (good
Broyden update), kept per sample and capped at `broyden_memory` terms. Without line search, as in
paper.md 2.2. The factors are held as [B, k, D] tensors with contiguous rows, so each product
is one batched matrix multiply instead of a re-stacked history per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Fn, IterateHook, RowsFn, SolverOutput, StepRecorder, StopHook


def _matvec(us: Tensor | None, vs: Tensor | None, x: Tensor) -> Tensor:
    """(-I + sum_i u_i v_i^T) x, per sample; x is [B, D], us and vs are [B, k, D]."""
    if us is None:
        return -x
    # Row-vector products ([B, 1, D] x [B, D, k], then [B, 1, k] x [B, k, D]): on CPU these run
    # several times faster than the equivalent matrix-times-column forms.
    coeff = torch.bmm(x.unsqueeze(1), vs.transpose(1, 2))  # [B, 1, k]: v_i . x
    return -x + torch.bmm(coeff, us).squeeze(1)


def _rmatvec(us: Tensor | None, vs: Tensor | None, x: Tensor) -> Tensor:
    """x^T (-I + sum_i u_i v_i^T), per sample."""
    if us is None:
        return -x
    coeff = torch.bmm(x.unsqueeze(1), us.transpose(1, 2))  # [B, 1, k]: x . u_i
    return -x + torch.bmm(coeff, vs).squeeze(1)


class _Factors:
    """The u_i and v_i of the inverse-Jacobian estimate, [B, k, D] each, at most `memory` terms.

    Without autograd they live in preallocated buffers overwritten oldest-first (the sum of
    rank-one terms does not depend on their order); under autograd (exact backprop through the
    solve) they grow by concatenation, since in-place writes would break the graph.
    """

    def __init__(self, memory: int, inplace: bool):
        self.memory, self.inplace, self.n = memory, inplace, 0
        self.us: Tensor | None = None
        self.vs: Tensor | None = None

    def add(self, u: Tensor, v: Tensor) -> None:
        if self.inplace:
            if self.us is None:
                self.us = u.new_zeros(u.shape[0], self.memory, u.shape[1])
                self.vs = v.new_zeros(v.shape[0], self.memory, v.shape[1])
            slot = self.n % self.memory
            self.us[:, slot] = u
            self.vs[:, slot] = v
        else:
            keep = self.memory - 1
            if self.us is None:
                self.us, self.vs = u.unsqueeze(1), v.unsqueeze(1)
            else:
                start = max(0, self.us.shape[1] - keep)
                old_u, old_v = self.us[:, start:], self.vs[:, start:]
                self.us = torch.cat([old_u, u.unsqueeze(1)], dim=1)
                self.vs = torch.cat([old_v, v.unsqueeze(1)], dim=1)
        self.n += 1

    def get(self) -> tuple[Tensor | None, Tensor | None]:
        if self.us is None or not self.inplace:
            return self.us, self.vs
        k = min(self.n, self.memory)
        return self.us[:, :k], self.vs[:, :k]


def broyden_solve(f: Fn, z0: Tensor, *, max_iter: int, tol: float = 1e-3, stop_mode: str = "rel",
                  broyden_memory: int = 30, on_iterate: IterateHook | None = None,
                  keep_states: bool = False, stop_when: StopHook | None = None,
                  deadline: Tensor | None = None,
                  f_rows: RowsFn | None = None, sync_free: bool = False,
                  **_: object) -> SolverOutput:
    """Quasi-Newton root finding of f(z) - z with per-sample low-rank inverse-Jacobian updates."""
    rec = StepRecorder(z0, max_iter, tol, stop_mode, on_iterate, keep_states, stop_when,
                       deadline, f_rows, sync_free)
    b = z0.shape[0]
    # A solve of max_iter steps makes at most max_iter - 1 updates: no need for more memory.
    factors = _Factors(max(1, min(broyden_memory, max_iter - 1)),
                       inplace=not torch.is_grad_enabled())
    z = z0
    x_prev: Tensor | None = None
    g_prev: Tensor | None = None
    while not rec.finished:
        fz = rec.evaluate(f, z)
        done = rec.check(fz, z)
        x = z.reshape(b, -1)
        g = fz.reshape(b, -1) - x
        if x_prev is not None:
            dx, dg = x - x_prev, g - g_prev
            us, vs = factors.get()
            v_t = _rmatvec(us, vs, dx)
            denom = (v_t * dg).sum(dim=1, keepdim=True)
            # Samples that did not move (frozen or stalled) get a null update instead of 0/0.
            safe = denom.abs() > 1e-12
            u = (dx - _matvec(us, vs, dg)) / torch.where(safe, denom, torch.ones_like(denom))
            u = torch.where(safe, u, torch.zeros_like(u))
            v_t = torch.where(safe, v_t, torch.zeros_like(v_t))
            factors.add(u, v_t)
        update = -_matvec(*factors.get(), g)
        x_prev, g_prev = x, g
        z_next = torch.nan_to_num(x + update).view_as(z)
        z = rec.commit(z_next, z, done, fz)
    return rec.output(z)
