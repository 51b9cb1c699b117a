"""Naive (optionally damped) fixed-point iteration: the reference every other solver must beat."""

from __future__ import annotations

from torch import Tensor

from .base import Fn, IterateHook, RowsFn, SolverOutput, StepRecorder, StopHook


def naive_solve(f: Fn, z0: Tensor, *, max_iter: int, tol: float = 1e-3, stop_mode: str = "rel",
                damping: float = 1.0, on_iterate: IterateHook | None = None,
                keep_states: bool = False, stop_when: StopHook | None = None,
                deadline: Tensor | None = None, f_rows: RowsFn | None = None,
                sync_free: bool = False, **_: object) -> SolverOutput:
    """Iterate z <- (1 - damping) z + damping f(z) until each sample's residual is under tol."""
    rec = StepRecorder(z0, max_iter, tol, stop_mode, on_iterate, keep_states, stop_when,
                       deadline, f_rows, sync_free)
    z = z0
    while not rec.finished:
        fz = rec.evaluate(f, z)
        done = rec.check(fz, z)
        z_next = fz if damping == 1.0 else (1 - damping) * z + damping * fz
        z = rec.commit(z_next, z, done, fz)
    return rec.output(z)
