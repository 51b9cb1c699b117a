"""Anderson acceleration (type II), batched with one mixing problem per sample.

Two histories hold the last `anderson_m` iterates. Without autograd (serving, training forwards,
phantom and implicit gradients) a preallocated ring buffer is written in place and the Gram
matrix of the residuals gains one row per step, so a step costs O(m D) on top of f instead of
the O(m^2 D) of rebuilding and multiplying stacked histories. With autograd on (exact backprop
through the iterations) in-place writes would invalidate saved tensors, so the history is kept
as lists and stacked each step. Both paths solve the same mixing problem and give the same
iterates up to floating-point rounding.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .base import Fn, IterateHook, RowsFn, SolverOutput, StepRecorder, StopHook


def anderson_solve(f: Fn, z0: Tensor, *, max_iter: int, tol: float = 1e-3, stop_mode: str = "rel",
                   anderson_m: int = 5, anderson_lam: float = 1e-4, beta: float = 1.0,
                   on_iterate: IterateHook | None = None, keep_states: bool = False,
                   stop_when: StopHook | None = None, deadline: Tensor | None = None,
                   history: str = "auto", f_rows: RowsFn | None = None,
                   sync_free: bool = False, **_: object) -> SolverOutput:
    """Mix the last `anderson_m` iterates with weights minimising the combined residual.

    Per sample: alpha = argmin ||sum_i alpha_i g_i||^2 + lam ||alpha||^2 s.t. sum_i alpha_i = 1,
    with g_i = f(x_i) - x_i; then z <- beta sum alpha_i f(x_i) + (1 - beta) sum alpha_i x_i.
    `history="list"` forces the stacked-list history (bench/solvers.py times both).
    """
    rec = StepRecorder(z0, max_iter, tol, stop_mode, on_iterate, keep_states, stop_when,
                       deadline, f_rows, sync_free)
    ring = history == "ring" or (history == "auto" and not torch.is_grad_enabled())
    history = _RingHistory(z0, anderson_m, beta) if ring else _ListHistory(anderson_m)
    consts: dict | None = {} if ring else None  # reused buffers: no autograd through them
    z = z0
    while not rec.finished:
        fz = rec.evaluate(f, z)
        done = rec.check(fz, z)
        history.push(z, fz)
        if history.n == 1:
            z_next = fz
        else:
            if ring:
                alpha = history.mixing_weights(anderson_lam)
            else:
                alpha = _mixing_weights(history.gram(), anderson_lam, consts)
            z_next = torch.nan_to_num(history.mix(alpha, beta)).view_as(z)
        z = rec.commit(z_next, z, done, fz)
    return rec.output(z)


def _work_dtype(z: Tensor) -> torch.dtype:
    # The small mixing problem is solved in at least float32 and outside autocast: under bf16
    # autocast the Gram matrix would lose the digits the mixing weights depend on, and batched
    # linear solves have no bf16 kernels on CUDA.
    return torch.promote_types(z.dtype, torch.float32)


def _mixing_weights(gram: Tensor, lam: float, consts: dict | None = None) -> Tensor:
    """alpha [B, n, 1] (work dtype) from the residual Gram matrices [B, n, n].

    Solves the bordered system [[0, 1^T], [1, G + lam s I]] [nu; alpha] = [1; 0], which
    enforces sum(alpha) = 1; s, the mean of G's diagonal, scales the ridge with the residual
    size so it regularises at every magnitude. Without autograd, `consts` keeps the system's
    buffers (border in place) and right-hand side across the steps of one solve and the Gram
    block is written into them: the same numbers as building the system out of place (the
    path under autograd, where a buffer saved for backward must not change), in fewer steps.
    """
    b, n, _ = gram.shape
    with torch.autocast(gram.device.type, enabled=False):
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
        bufs = None if consts is None else consts.get((b, n))
        if bufs is None:
            lhs = torch.zeros(b, n + 1, n + 1, device=gram.device, dtype=gram.dtype)
            lhs[:, 0, 1:] = 1
            lhs[:, 1:, 0] = 1
            rhs = torch.zeros(b, n + 1, 1, device=gram.device, dtype=gram.dtype)
            rhs[:, 0] = 1
            bufs = (lhs, rhs)
            if consts is not None:
                consts[(b, n)] = bufs
        lhs, rhs = bufs
        if consts is None:
            eye = torch.eye(n, device=gram.device, dtype=gram.dtype)
            lhs = lhs + torch.nn.functional.pad(gram + lam * scale.view(b, 1, 1) * eye,
                                                (1, 0, 1, 0))
        else:
            inner = lhs[:, 1:, 1:]
            inner.copy_(gram)
            inner.diagonal(dim1=1, dim2=2).add_((lam * scale).unsqueeze(1))
        return torch.linalg.solve(lhs, rhs)[:, 1:]


class _ListHistory:
    """Differentiable history: lists of flattened states, stacked when needed."""

    def __init__(self, m: int):
        self.m = m
        self.xs: list[Tensor] = []
        self.fs: list[Tensor] = []

    @property
    def n(self) -> int:
        return len(self.xs)

    def push(self, z: Tensor, fz: Tensor) -> None:
        b = z.shape[0]
        self.xs = [*self.xs, z.reshape(b, -1)][-self.m:]
        self.fs = [*self.fs, fz.reshape(b, -1)][-self.m:]

    def gram(self) -> Tensor:
        x_hist, f_hist = torch.stack(self.xs, dim=1), torch.stack(self.fs, dim=1)  # [B, n, D]
        with torch.autocast(x_hist.device.type, enabled=False):
            g = (f_hist - x_hist).to(_work_dtype(x_hist))
            return torch.bmm(g, g.transpose(1, 2))

    def mix(self, alpha: Tensor, beta: float) -> Tensor:
        f_hist = torch.stack(self.fs, dim=1)
        alpha = alpha.to(f_hist.dtype)
        mixed = (alpha * f_hist).sum(dim=1)
        if beta != 1.0:
            mixed = beta * mixed + (1 - beta) * (alpha * torch.stack(self.xs, dim=1)).sum(dim=1)
        return mixed


class _RingHistory:
    """In-place history for solves without autograd: ring buffers and an incremental Gram.

    Slot k = t mod m holds step t; the valid slots are always the first n, and the mixing problem
    does not depend on their order. At small batches a step's cost is the number of tensor ops,
    not their arithmetic, so every view a step writes or reads (a slot, the first n slots, a Gram
    row and column, the mixing system's blocks) is made once per solve and reused: the same
    kernels on the same numbers as indexing afresh, in fewer dispatches.
    """

    def __init__(self, z0: Tensor, m: int, beta: float = 1.0):
        b, d = z0.shape[0], z0[0].numel()
        self.m, self.t = m, 0
        work = _work_dtype(z0)
        # the iterates themselves only enter a damped mix (beta < 1)
        self.x = z0.new_empty(b, m, d) if beta != 1.0 else None
        self.f = z0.new_empty(b, m, d)
        self.g = z0.new_empty(b, m, d, dtype=work)
        self.g_gram = z0.new_zeros(b, m, m, dtype=work)
        self._views: dict[tuple, object] = {}

    @property
    def n(self) -> int:
        return min(self.t, self.m)

    def _slot(self, k: int, n: int) -> tuple:
        """(x slot, f slot, g slot, the same [B, 1, D], first n g slots, Gram row k, Gram
        column k)."""
        key = ("slot", k, n)
        v = self._views.get(key)
        if v is None:
            x_k = None if self.x is None else self.x[:, k]
            v = (x_k, self.f[:, k], self.g[:, k], self.g[:, k].unsqueeze(1), self.g[:, :n],
                 self.g_gram[:, k, :n], self.g_gram[:, :n, k])
            self._views[key] = v
        return v

    def push(self, z: Tensor, fz: Tensor) -> None:
        b, k = z.shape[0], self.t % self.m
        self.t += 1
        x_k, f_k, g_k, g_k1, g_n, row_k, col_k = self._slot(k, self.n)
        z_flat, f_flat = z.reshape(b, -1), fz.reshape(b, -1)
        if x_k is not None:
            x_k.copy_(z_flat)
        f_k.copy_(f_flat)
        torch.sub(f_flat, z_flat, out=g_k)
        # Products and sums rather than bmm: BLAS picks kernels by batch size, and a sample's
        # answer must not depend on its batch mates.
        row = (g_n * g_k1).sum(dim=2)  # [B, n]
        row_k.copy_(row)
        col_k.copy_(row)

    def gram(self) -> Tensor:
        n = self.n
        return self.g_gram[:, :n, :n]

    def mixing_weights(self, lam: float) -> Tensor:
        """`_mixing_weights(self.gram(), lam, consts)`, the same kernels on the same numbers,
        with the bordered system's buffers and views kept across the solve's steps."""
        n = self.n
        key = ("system", n)
        v = self._views.get(key)
        if v is None:
            gram = self.g_gram[:, :n, :n]
            b = gram.shape[0]
            lhs = gram.new_zeros(b, n + 1, n + 1)
            lhs[:, 0, 1:] = 1
            lhs[:, 1:, 0] = 1
            rhs = gram.new_zeros(b, n + 1, 1)
            rhs[:, 0] = 1
            inner = lhs[:, 1:, 1:]
            v = (gram, gram.diagonal(dim1=1, dim2=2), lhs, rhs, inner,
                 inner.diagonal(dim1=1, dim2=2))
            self._views[key] = v
        gram, gram_diag, lhs, rhs, inner, inner_diag = v  # type: ignore[misc]
        # autocast off (see _work_dtype); entering the context costs more than the test
        ctx = (torch.autocast(gram.device.type, enabled=False)
               if torch.is_autocast_enabled(gram.device.type) else contextlib.nullcontext())
        with ctx:
            scale = gram_diag.mean(dim=1).clamp_min(1e-12)
            inner.copy_(gram)
            inner_diag.add_((lam * scale).unsqueeze(1))
            # solve_ex: solve without its error check (a singular system is not an error here:
            # the ridge keeps it regular, and NaNs are cleared by the caller's nan_to_num)
            return torch.linalg.solve_ex(lhs, rhs)[0][:, 1:]

    def mix(self, alpha: Tensor, beta: float) -> Tensor:
        n = self.n
        key = ("mix", n)
        v = self._views.get(key)
        if v is None:
            v = (self.f[:, :n], None if self.x is None else self.x[:, :n])
            self._views[key] = v
        f_n, x_n = v  # type: ignore[misc]
        a = alpha if alpha.dtype == self.f.dtype else alpha.to(self.f.dtype)  # [B, n, 1]
        mixed = (a * f_n).sum(dim=1)
        if beta != 1.0:
            mixed = beta * mixed + (1 - beta) * (a * x_n).sum(dim=1)
        return mixed
