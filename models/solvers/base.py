"""What every solver shares: the result type, residuals and per-sample stopping.

Solvers work on batched states of any shape [B, ...]. Each sample stops on its own: once its
residual is under `tol` its state is frozen (masked updates), so a sample's result does not depend
on its batch mates. Statistics are recorded per step without keeping the states themselves unless
`keep_states` is asked for.

Step t (1-based) evaluates f at z_{t-1}; `residual[t-1]` is the residual of z_{t-1}, and the step
produces z_t. A sample whose residual passes `tol` at step t ends with z_t = f(z_{t-1}).

Anytime stopping (serving): besides `tol` and `max_iter`, a sample may stop because a caller's
`stop_when` hook says its iterate is good enough ("settled", see models/anytime.py), or because its
own wall-clock `deadline` has passed. Both act per sample, after the step, on the iterate z_t the
step produced, so one sample's criterion never changes another's answer. `stopped` records why
each sample stopped, as an index into STOP_REASONS.

Host syncs (`sync_free`): by default a step reads back from the device how many samples are
left, so that the solve ends as soon as none is and f skips stopped samples. On a GPU each read
waits for every queued kernel: one regulated PGD-7 training step read back 52 times, 44 of them
in its solves (batch 4, counted with torch.profiler on a CPU).
`sync_free=True` never reads back: every step runs on the whole batch up to `max_iter`, the
stopping masks applied on the device. The answers are the same bits (a stopped sample's state
is frozen either way and its residual row repeats), at the cost of f evaluations a stopped
sample no longer needs and a few mask operators per step (295 operators for a 12-step forward
of the default's architecture become 338); `residual` then always has `max_iter` rows. What
needs it is a captured CUDA graph (training/graphs.py), which cannot read back at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deqguard.solve_rules import STOP_REASONS

Fn = Callable[[Tensor], Tensor]
# Called after each step with (t, z_t, active) where `active` marks samples still iterating before
# the step; the model uses it to decode every iterate without the solver keeping them.
IterateHook = Callable[[int, Tensor, Tensor], None]
# Called after the iterate hook with (t, z_t, active); returns [B] bool: samples to stop now.
StopHook = Callable[[int, Tensor, Tensor], Tensor]
# f on a subset of the batch: (z_rows, rows) -> f(z)[rows] for z_rows = z[rows]. A model whose
# f closes over per-sample inputs (the DEQ's injection u) gives it so that the solvers can skip
# the samples that already stopped; see StepRecorder.evaluate.
RowsFn = Callable[[Tensor, Tensor], Tensor]

# Why a sample stopped: `SolverOutput.stopped` holds indices into STOP_REASONS.
STOP_MAX_ITER = STOP_REASONS.index("max_iter")
STOP_TOL = STOP_REASONS.index("tol")
STOP_SETTLED = STOP_REASONS.index("settled")
STOP_DEADLINE = STOP_REASONS.index("deadline")

_EPS = 1e-9


@dataclass
class SolverOutput:
    """Final states and per-step statistics of one solve.

    `residual` is [T, B] where T is the number of steps the batch ran (the largest per-sample
    count); a sample that stopped early repeats its last value. `iterations` [B] counts the steps
    each sample took and `converged` [B] says whether it reached `tol`; `stopped` [B] says why it
    stopped (an index into STOP_REASONS).
    """

    z: Tensor
    residual: Tensor
    iterations: Tensor
    converged: Tensor
    states: list[Tensor] | None = field(default=None, repr=False)
    stopped: Tensor | None = None


def residual(fz: Tensor, z: Tensor, stop_mode: str) -> Tensor:
    """Per-sample fixed-point residual ||f(z) - z||, relative to ||f(z)|| when stop_mode='rel'."""
    # torch.linalg.vector_norm is what Tensor.norm(dim=1) calls, without its Python dispatch;
    # reduced over the trailing dimensions rather than a flattened view, which would copy a
    # channels_last state on every step (the same bits for a contiguous one)
    dims = tuple(range(1, z.dim()))
    diff = torch.linalg.vector_norm(fz - z, 2, dims)
    if stop_mode == "rel":
        return diff / (torch.linalg.vector_norm(fz, 2, dims) + _EPS)
    return diff


def batch_where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.where with a per-sample mask [B] broadcast over the state's trailing dimensions."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


class StepRecorder:
    """Tracks per-sample stopping and statistics across steps (shared by all solvers)."""

    def __init__(self, z0: Tensor, max_iter: int, tol: float, stop_mode: str,
                 on_iterate: IterateHook | None, keep_states: bool,
                 stop_when: StopHook | None = None, deadline: Tensor | None = None,
                 f_rows: RowsFn | None = None, sync_free: bool = False):
        """`deadline`: [B] float64 absolute `time.time()` seconds per sample (inf: none); a sample
        whose deadline has passed stops after its current step (so always after one step).
        `f_rows`: f on a subset of samples (RowsFn); with it `evaluate` skips stopped samples
        (not with `sync_free`: picking the rows is a read back). `sync_free`: see the module."""
        b = z0.shape[0]
        self.tol, self.stop_mode, self.max_iter = tol, stop_mode, max_iter
        self.on_iterate = on_iterate
        self.active = torch.ones(b, dtype=torch.bool, device=z0.device)
        self.iterations = torch.zeros(b, dtype=torch.long, device=z0.device)
        self.last_residual = torch.full((b,), float("inf"), device=z0.device)
        self.residuals: list[Tensor] = []
        self.states: list[Tensor] | None = [] if keep_states else None
        self.t = 0
        self.stop_when = stop_when
        self.deadline = None if deadline is None else deadline.to(torch.float64).cpu()
        self.stopped = torch.full((b,), STOP_MAX_ITER, dtype=torch.long, device=z0.device)
        self.sync_free = sync_free
        self.f_rows = f_rows if b > 1 and not sync_free else None
        self._all_active = True
        # Host-side bookkeeping (see `finished`): samples left (None: count at the next
        # `finished`), and steps every sample took that are not yet added to `iterations`.
        # Without stop hooks the step's one host sync counts the samples stopping on `tol` in
        # `check`; with them it stays in `finished`, after the hooks acted.
        self._left: int | None = b
        self._uniform_steps = 0
        self._count_in_check = stop_when is None and self.deadline is None and not sync_free
        self._done_count: int | None = None

    def evaluate(self, f: Fn, z: Tensor) -> Tensor:
        """f(z) for the samples still iterating; a stopped sample gets its own state back.

        A stopped sample's f value is never used (its state is frozen and its residual row
        repeats), so once some samples stop, f runs on the others only: at batch 32 most of a
        solve's steps wait for a few slow samples. The subset keeps at least two rows (a lone
        row is duplicated): convolution and GroupNorm kernels give every row of a batch of two
        or more the same bits whatever its batch mates, while a batch of one takes another
        code path, so the active samples' answers stay exactly those of the full evaluation.
        """
        if self.f_rows is None or self._all_active:
            return f(z)
        rows = self.active.nonzero().flatten()
        n = rows.numel()
        if n == 0:
            return z
        take = rows if n > 1 else rows.repeat(2)
        fz_rows = self.f_rows(z.index_select(0, take), take)[:n]
        return z.to(fz_rows.dtype).index_copy(0, rows, fz_rows)

    def check(self, fz: Tensor, z: Tensor) -> Tensor:
        """Record the residual of z (the state this step started from); return samples now done."""
        self.t += 1
        if torch.is_grad_enabled():
            with torch.no_grad():
                r = residual(fz.detach(), z.detach(), self.stop_mode)
        else:
            r = residual(fz, z, self.stop_mode)
        # While every sample iterates the masks are all true: the masked forms would return
        # the same numbers, so they are skipped (fewer ops per step at small batches).
        if self._all_active:
            self._uniform_steps += 1  # one more step for everyone, added in `_flush_steps`
            done = r < self.tol
        else:
            r = torch.where(self.active, r, self.last_residual)
            self._flush_steps()
            self.iterations = self.iterations + self.active  # one more step for the active
            done = self.active & (r < self.tol)
        self.last_residual = r
        self.residuals.append(r)
        if self._count_in_check:
            # the step's one host sync: how many stop now (`commit` and `finished` use it)
            self._done_count = int(done.sum())
        return done

    def commit(self, z_next: Tensor, z: Tensor, done_now: Tensor, fz: Tensor) -> Tensor:
        """Apply the step to active samples only; finished samples end on f(z).

        A mask that selects everything (no sample stops now, every sample still iterates) is
        skipped: it would return its input unchanged. `done_now` must be what `check` returned
        this step (when `check` counted them).
        """
        n_done, self._done_count = self._done_count, None
        # an undamped naive step's z_next is fz itself: nothing to choose between
        stepped = z_next if n_done == 0 or z_next is fz else batch_where(done_now, fz, z_next)
        z_new = stepped if self._all_active else batch_where(self.active, stepped, z)
        if self.on_iterate is not None:
            self.on_iterate(self.t, z_new, self.active)
        if self.states is not None:
            self.states.append(z_new)
        if n_done != 0:
            # rebuilt, never changed in place: on_iterate hooks may keep the old mask.
            # done_now lies within active (check made it so): xor drops it in one operator.
            self.active = self.active ^ done_now
            if n_done is None or self._left is None:
                self._left = None
            else:
                self._left -= n_done
        if self.stop_when is not None:
            self._stop(self.stop_when(self.t, z_new, self.active), STOP_SETTLED)
        if self.deadline is not None:
            late = self.deadline <= time.time()
            self._stop(late.to(self.active.device), STOP_DEADLINE)
        return z_new

    def _stop(self, mask: Tensor, reason: int) -> None:
        mask = self.active & mask
        self.stopped = torch.where(mask, reason, self.stopped)
        self.active = self.active & ~mask
        self._left = None

    @property
    def finished(self) -> bool:
        if self.t >= self.max_iter:
            return True
        if self.sync_free:  # no count to read: the masks act from the second step on
            self._all_active = self.t == 0
            return False
        if self._left is None:  # the step's one host sync, when `check` did not count
            self._left = int(self.active.sum())
        # anyone left, and everyone left
        self._all_active = self._left == self.active.numel()
        return self._left == 0

    def _flush_steps(self) -> None:
        if self._uniform_steps:
            self.iterations = self.iterations + self._uniform_steps
            self._uniform_steps = 0

    def output(self, z: Tensor) -> SolverOutput:
        res = torch.stack(self.residuals) if self.residuals else z.new_zeros(0, z.shape[0])
        self._flush_steps()
        converged = self.last_residual < self.tol
        # A sample stops on `tol` exactly when it ends converged: its residual is frozen at the
        # value that passed, while one stopped otherwise (or never) last had a residual at or
        # over `tol`. So the reason is set once here rather than at every step.
        stopped = torch.where(converged, STOP_TOL, self.stopped)
        return SolverOutput(z=z, residual=res, iterations=self.iterations,
                            converged=converged, states=self.states, stopped=stopped)
