"""The model behind the service: a batch of [N, C, H, W] arrays + options -> ClassifyResult list.

Kept out of the BentoML service file so that the benchmark, the tests and any other host can run
exactly what the server runs. `ModelEngine` is what every backend shares: option resolution,
batching, answers. The backends are the checkpoint's torch model (`torch_engine.py`: every
solver, the defense) and onnxruntime (`onnx_engine.py`: a fixed-iteration naive solver), chosen
by `factory.load_engine`; this module knows neither.

Batch invariance (a sample's answer does not depend on its batch mates): solvers stop per sample
at `tol` and freeze finished samples, so within one set of options results are per-sample; the
service runs each distinct `SolveOptions` as its own sub-batch (the options key), and every
trajectory is cut to the sample's own iteration count (traces.py).

Anytime inference: the settled exit (`settle_iters` / `settle_entropy`, models/anytime.py) is part
of the options key; a deadline is not (every request's is different) but travels per sample as an
absolute time, and the solver stops each sample at its own deadline only, so a batch mate's
deadline never changes an answer. `stopped` says which criterion ended a sample. The server's
compute budget (`request_budget_ms`) is one more deadline per sample; where it comes before the
caller's own, a sample it stops says `stopped="budget"`, and a selective answer abstains on it.

Trajectories are always computed, since detection scores read them; the `trajectory` flag only
decides whether they are returned. A calibrated decision (the detector's, or a selective one
below full coverage) reads full solves, so the settled exit stands aside for it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from deqguard.solve_rules import BUDGET_STOP, DEADLINE_STOP, DEFENSES, SOLVERS

from .answers import AnswerBuilder
from .attack_detection import Detector
from .options import OptionsError, SolveOptions, fill, option_problem
from .schema import ClassifyResult
from .selective import Selector
from .traces import SampleTrace

log = logging.getLogger(__name__)


class ModelEngine(ABC):
    """A loaded checkpoint that classifies batches of arrays; one call at a time (a lock)."""

    backend: str = "?"
    computes_features: bool = True  # dynamics features (the learned detector's inputs)

    def __init__(self, meta: Any, *, max_iter_cap: int):
        self.meta = meta  # deqguard.models.CheckpointMetadata
        self.spec = meta.input
        self.max_iter_cap = int(max_iter_cap)
        self.answers = AnswerBuilder(meta)
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.pair_singles = True
        # The server's per-request deadline (settings.request_budget_ms), as GET /model shows
        # it; the front turns it into each item's budget (`classify_grouped`).
        self.request_budget_ms: int | None = None

    @property
    def detector(self) -> Detector:
        return self.answers.detector

    @property
    def selector(self) -> Selector:
        return self.answers.selector

    @selector.setter
    def selector(self, selector: Selector) -> None:
        self.answers.selector = selector

    # -- options -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def is_deq(self) -> bool: ...

    @abstractmethod
    def checkpoint_options(self, defense: str = "none") -> SolveOptions:
        """The checkpoint's own defaults for `defense`, before the iteration cap."""

    def default_options(self, defense: str = "none") -> SolveOptions:
        """What a request that sets nothing runs: the checkpoint's defaults under the cap."""
        d = self.checkpoint_options(defense)
        return replace(d, max_iter=min(d.max_iter, self.max_iter_cap))

    @property
    def cap_text(self) -> str:
        """The iteration cap as refusals name it."""
        return f"the server cap {self.max_iter_cap}"

    def check_options(self, opts: SolveOptions) -> None:
        """Raise OptionsError naming the problem (the front answers it with a 4xx)."""
        problem = option_problem(opts, max_iter_cap=self.max_iter_cap, cap_text=self.cap_text,
                                 is_deq=self.is_deq)
        problem = problem or self.selector.problem(
            opts, features=self.computes_features and self.is_deq)
        if problem:
            raise OptionsError(problem)

    def check_deadline(self, opts: SolveOptions) -> None:
        """Raise OptionsError when this engine cannot stop `opts` at a deadline."""
        if opts.defense != "none":
            raise OptionsError(f"deadline_ms applies to the plain solve, not to the "
                               f"{opts.defense} defense")
        problem = self.selector.problem(opts, features=self.computes_features and self.is_deq,
                                        deadline=True)
        if problem:
            raise OptionsError(problem)

    def wants_features(self, opts: SolveOptions) -> bool:
        """Whether the solve must compute the dynamics features (detector or selective score)."""
        return self.detector.wants_features(opts) or self.selector.needs_features(opts)

    def reads_dynamics(self, opts: SolveOptions) -> bool:
        """Whether a calibrated decision reads this request's full trajectory: the settled exit
        would truncate it, so it stands aside."""
        return self.detector.reads_dynamics(opts) or self.selector.reads_dynamics(opts)

    def resolve(self, *, deadline_ms: int | None = None, **options: Any) -> SolveOptions:
        """Fill unset options (keyword arguments of `options.fill`) from the checkpoint's
        defaults, then check them. `deadline_ms` is only checked (deadlines travel per sample,
        see `trace`)."""
        opts = fill(self.default_options(options.get("defense") or "none"), **options)
        self.check_options(opts)
        if deadline_ms is not None:
            self.check_deadline(opts)
        return opts

    # -- running -------------------------------------------------------------------------------
    @abstractmethod
    def _solve(self, x: np.ndarray, opts: SolveOptions,
               deadlines: np.ndarray | None) -> list[SampleTrace]: ...

    def trace(self, x: np.ndarray, opts: SolveOptions, deadlines: np.ndarray | None = None
              ) -> list[SampleTrace]:
        """Per-sample traces for float32 x [N, C, H, W] in [0, 1] (validated by the caller).

        `deadlines`: [N] absolute `time.time()` seconds (inf: none); a sample past its deadline
        stops after its current iteration with `stopped="deadline"`.

        A lone sample runs as a pair (itself twice): oneDNN convolutions take another code path
        for a batch of one, whose sums differ in the last bit, and Anderson/Broyden amplify that
        to ~1e-4 over a solve. Batches of two or more agree bit for bit on CPU whatever their
        size and order, so this makes answers identical however requests were batched.
        On CUDA it is not enough: measured on an H200 (torch 2.11), cuDNN/cuBLAS results depend
        on the batch size itself, and a 30-step Broyden solve differed by up to 1e-2 in logits
        (iteration counts by one) between a batch of 20 and of 7.
        `pair_singles = False` (DEQGUARD_BATCH_INVARIANT=false) saves that compute for lone
        requests at the price of last-bit differences.
        """
        n = x.shape[0]
        if n == 0:
            return []
        x = np.ascontiguousarray(x, dtype=np.float32)
        if deadlines is not None:
            deadlines = np.asarray(deadlines, np.float64)
            if np.isinf(deadlines).all():
                deadlines = None
        if n == 1 and self.pair_singles:
            x = np.concatenate([x, x])
            deadlines = None if deadlines is None else np.concatenate([deadlines, deadlines])
        with self._lock:
            return self._solve(x, opts, deadlines)[:n]

    def result(self, trace: SampleTrace, opts: SolveOptions, trajectory: bool) -> ClassifyResult:
        """The JSON answer to one traced sample (answers.py)."""
        return self.answers.answer(trace, opts, trajectory)

    def results(self, traces: Sequence[SampleTrace], opts: Sequence[SolveOptions],
                trajectory: Sequence[bool]) -> list[ClassifyResult]:
        """`result` for each traced sample, its scores computed for the batch at once: the
        same answers (answers.py `AnswerBuilder.answers`)."""
        return self.answers.answers(traces, opts, trajectory)

    def classify(self, x: np.ndarray, opts: SolveOptions, trajectory: bool = True,
                 deadlines: np.ndarray | None = None) -> list[ClassifyResult]:
        """The in-process twin of POST /classify_tensor with one set of options."""
        traces = self.trace(x, opts, deadlines)
        return self.results(traces, [opts] * len(traces), [trajectory] * len(traces))

    def classify_grouped(self, xs: Sequence[np.ndarray], opts: Sequence[SolveOptions],
                         deadlines: Sequence[float] | None = None,
                         budgets: Sequence[float] | None = None) -> list[SampleTrace]:
        """Items with mixed options: one sub-batch per distinct options, answers in input order.
        `deadlines` (the callers') and `budgets` (the server's, `request_budget_ms`), absolute
        time.time() seconds with inf for none, stay per item: the earlier one stops it, and a
        stop at the budget says stopped="budget"."""
        n = len(xs)
        own = [np.inf] * n if deadlines is None else [float(d) for d in deadlines]
        server = [np.inf] * n if budgets is None else [float(b) for b in budgets]
        cut = [min(d, b) for d, b in zip(own, server, strict=True)]
        groups: dict[SolveOptions, list[int]] = {}
        for i, o in enumerate(opts):
            groups.setdefault(o, []).append(i)
        out: list[SampleTrace | None] = [None] * n
        for o, idx in groups.items():
            dl = np.array([cut[i] for i in idx], np.float64)
            traces = self.trace(np.stack([xs[i] for i in idx]), o, dl)
            for i, t in zip(idx, traces, strict=True):
                out[i] = (replace(t, stopped=BUDGET_STOP)
                          if t.stopped == DEADLINE_STOP and server[i] < own[i] else t)
        return out  # type: ignore[return-value]

    def warm_up(self) -> None:
        """Run the default path once (allocators, kernels, lazy init) and mark ready."""
        s = self.spec
        x = np.zeros((2, s.channels, s.height, s.width), np.float32)
        self.classify(x, self.default_options())
        self.ready.set()

    def describe(self) -> dict[str, Any]:
        """What GET /model answers: checkpoint metadata plus how this server runs it."""
        d = self.default_options()
        return {
            **self.meta.model_dump(mode="json"),
            "serving": {"backend": self.backend, "max_iter_cap": self.max_iter_cap,
                        "defaults": {"max_iter": d.max_iter, "tol": d.tol, "solver": d.solver,
                                     "settle_iters": d.settle_iters,
                                     "settle_entropy": d.settle_entropy},
                        "request_budget_ms": self.request_budget_ms,
                        "defenses": self.defenses(), "solvers": self.solvers(),
                        "selective": self.selector.describe()},
        }

    def defenses(self) -> list[str]:
        return list(DEFENSES) if self.is_deq else ["none"]

    def solvers(self) -> list[str]:
        return list(SOLVERS)
