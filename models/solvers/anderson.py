"""Anderson acceleration (type II), batched with one mixing problem per sample.

The history is kept in Python lists rather than preallocated buffers written in place, so that the
whole solve stays differentiable when exact backprop through the iterations is asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Fn, IterateHook, SolverOutput, StepRecorder, StopHook


def anderson_solve(f: Fn, z0: Tensor, *, max_iter: int, tol: float = 1e-3, stop_mode: str = "rel",
                   anderson_m: int = 5, anderson_lam: float = 1e-4, beta: float = 1.0,
                   on_iterate: IterateHook | None = None, keep_states: bool = False,
                   stop_when: StopHook | None = None, deadline: Tensor | None = None,
                   **_: object) -> SolverOutput:
    """Mix the last `anderson_m` iterates with weights minimising the combined residual.

    Per sample: alpha = argmin ||sum_i alpha_i g_i||^2 + lam ||alpha||^2 s.t. sum_i alpha_i = 1,
    with g_i = f(x_i) - x_i; then z <- beta sum alpha_i f(x_i) + (1 - beta) sum alpha_i x_i.
    """
    rec = StepRecorder(z0, max_iter, tol, stop_mode, on_iterate, keep_states, stop_when,
                       deadline)
    b = z0.shape[0]
    xs: list[Tensor] = []
    fs: list[Tensor] = []
    z = z0
    while not rec.finished:
        fz = f(z)
        done = rec.check(fz, z)
        xs.append(z.reshape(b, -1))
        fs.append(fz.reshape(b, -1))
        xs, fs = xs[-anderson_m:], fs[-anderson_m:]
        n = len(xs)
        if n == 1:
            z_next = fz
        else:
            x_hist = torch.stack(xs, dim=1)  # [B, n, D]
            f_hist = torch.stack(fs, dim=1)
            # The small mixing problem is solved in at least float32 and outside autocast: under
            # bf16 autocast the Gram matrix would lose the digits the mixing weights depend on,
            # and batched linear solves have no bf16 kernels on CUDA.
            work = torch.promote_types(z.dtype, torch.float32)
            with torch.autocast(z.device.type, enabled=False):
                g = (f_hist - x_hist).to(work)
                gram = torch.bmm(g, g.transpose(1, 2))
                # Scale the ridge term with the residual size so it regularises at every magnitude.
                scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
                eye = torch.eye(n, device=z.device, dtype=work)
                gram = gram + anderson_lam * scale.view(b, 1, 1) * eye
                # Bordered system [[0, 1^T], [1, G]] [nu; alpha] = [1; 0] enforces sum(alpha) = 1.
                border = torch.zeros(n + 1, n + 1, device=z.device, dtype=work)
                border[0, 1:] = 1
                border[1:, 0] = 1
                lhs = torch.nn.functional.pad(gram, (1, 0, 1, 0)) + border
                rhs = torch.zeros(b, n + 1, 1, device=z.device, dtype=work)
                rhs[:, 0] = 1
                alpha = torch.linalg.solve(lhs, rhs)[:, 1:].to(f_hist.dtype)  # [B, n, 1]
            mixed = (alpha * f_hist).sum(dim=1)
            if beta != 1.0:
                mixed = beta * mixed + (1 - beta) * (alpha * x_hist).sum(dim=1)
            mixed = torch.nan_to_num(mixed)
            z_next = mixed.view_as(z)
        z = rec.commit(z_next, z, done, fz)
    return rec.output(z)
