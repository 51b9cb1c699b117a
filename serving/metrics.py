"""Prometheus metrics of the solves themselves, next to BentoML's request metrics on /metrics.

Created with prometheus_client directly, as BentoML's docs advise: under `bentoml serve` every
worker writes to the shared PROMETHEUS_MULTIPROC_DIR, which /metrics reads. Labels stay few
(backend, solver, defense). The batch-size histogram keeps the name and labels BentoML's
adaptive batching gave it (method "infer"), so dashboards built on it read the service's own
micro-batcher (runner.py) unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from .options import SolveOptions
from .schema import ClassifyResult
from .traces import SampleTrace

_LABELS = ("backend", "solver", "defense")

SOLVER_ITERATIONS = Histogram(
    "deqguard_solver_iterations", "Solver iterations per classified image", _LABELS,
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100, 150, 250, 500, 1000))
FINAL_RESIDUAL = Histogram(
    "deqguard_final_residual", "Relative fixed-point residual at the last iterate", _LABELS,
    buckets=(1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0))
FINAL_ENTROPY = Histogram(
    "deqguard_final_entropy", "Prediction entropy (nats) of the returned answer", _LABELS,
    buckets=(0.001, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0))
SUSPICIOUS = Counter(
    "deqguard_suspicious_answers", "Answers flagged suspicious by the detection threshold",
    _LABELS)

ABSTAINED = Counter(
    "deqguard_abstained_answers", "Answers that abstained at the request's coverage (< 1)",
    _LABELS)


@functools.cache
def _batch_size() -> Histogram:
    """Created on first use: a process that also runs a BentoML batchable API registers the
    same name itself, and two registrations of one name fail."""
    return Histogram(
        "bentoml_service_adaptive_batch_size", "Images per model call (the service's batcher)",
        ("runner_name", "worker_index", "method_name", "service_version", "service_name"),
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


def observe_batch(size: int) -> None:
    """One model call of `size` images, labelled as BentoML labels its batches."""
    from bentoml._internal.context import server_context

    _batch_size().labels("deqguard", server_context.worker_index, "infer",
                          server_context.bento_version, server_context.bento_name).observe(size)


def declare(backend: str, solvers: Iterable[str], defenses: Iterable[str]) -> None:
    """Create the counters' series at 0, so /metrics shows them before the first flagged or
    abstained answer."""
    defenses = list(defenses)
    for solver in solvers:
        for defense in defenses:
            SUSPICIOUS.labels(backend, solver, defense)
            ABSTAINED.labels(backend, solver, defense)


def observe(backend: str, items: Iterable[tuple[SampleTrace, SolveOptions, ClassifyResult]]
            ) -> None:
    for trace, opts, result in items:
        labels = (backend, opts.solver, opts.defense)
        SOLVER_ITERATIONS.labels(*labels).observe(trace.iterations)
        FINAL_RESIDUAL.labels(*labels).observe(float(trace.residual[-1]))
        FINAL_ENTROPY.labels(*labels).observe(float(trace.entropy[-1]))
        if result.detection.suspicious:
            SUSPICIOUS.labels(*labels).inc()
        if result.abstained:
            ABSTAINED.labels(*labels).inc()
