"""The model side of the service, in the HTTP process: per-image items -> answers, batched.

`ModelRunner` owns the loaded engine and the micro-batcher (batcher.py) that feeds it: requests
submit their images as `Item`s (options already resolved by the front, deadlines absolute); one
compute thread warms the engine up, then answers every call, grouping items by options
(`ModelEngine.classify_grouped`) so that an answer never depends on its batch mates. The solve
metrics (metrics.py) and the batch-size histogram are recorded here, per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import metrics
from .batcher import MicroBatcher
from .engine import ModelEngine
from .options import SolveOptions

log = logging.getLogger("deqguard.serving")

# Items per model call. A request of more images (up to max_batch) runs in slices of this size;
# concurrent requests share a call up to it.
MODEL_BATCH = 64
# The longest a free model waits for the batch its recent demand promises (batcher.py); a
# wait is also never longer than the previous call took.
FILL_WAIT_S = 0.25


@dataclass(frozen=True)
class Item:
    """One image of a request: float32 [C, H, W], resolved options, whether to return the
    trajectories, and the caller's deadline and the server's budget as absolute time.time()
    seconds (None: none)."""

    x: np.ndarray
    opts: SolveOptions
    trajectory: bool = True
    deadline_at: float | None = None
    budget_at: float | None = None


def patience(items: Sequence[Item]) -> float:
    """How long these items may wait for batch mates before their call starts: not at all
    with a caller's deadline (waiting would spend it), else until the earliest server budget."""
    if any(it.deadline_at is not None for it in items):
        return 0.0
    budgets = [it.budget_at for it in items if it.budget_at is not None]
    return min(budgets) - time.time() if budgets else float("inf")


class ModelRunner:
    """The engine behind a micro-batcher: `await runner.answer(items)` -> ClassifyResult dicts."""

    def __init__(self, engine: ModelEngine, *, threads: int = 1, max_batch: int = MODEL_BATCH,
                 max_wait_s: float = FILL_WAIT_S):
        self.engine = engine
        self.threads = int(threads)
        self.batcher: MicroBatcher[Item, dict[str, Any]] = MicroBatcher(
            self._infer, max_batch=max_batch, prepare=self._prepare,
            on_batch=metrics.observe_batch, name="deqguard-model", max_wait_s=max_wait_s,
            patience=patience)

    @property
    def ready(self) -> bool:
        return self.engine.ready.is_set()

    @property
    def failed(self) -> BaseException | None:
        return self.batcher.failed

    async def answer(self, items: list[Item]) -> list[dict[str, Any]]:
        return await self.batcher.submit(items)

    def close(self) -> None:
        self.batcher.close()

    def _prepare(self) -> None:
        """On the compute thread, before any request: its torch threads pinned as the settings
        say (a thread of its own must not fall back to torch's one-per-core default), then the
        warm-up that marks the engine ready."""
        if self.engine.backend == "torch":
            from .torch_engine import set_torch_threads

            set_torch_threads(self.threads)
        self.engine.warm_up()
        log.info("deqguard model warm (%s backend)", self.engine.backend)

    def _infer(self, items: list[Item]) -> list[dict[str, Any]]:
        """One model call: every item's trace (one sub-batch per distinct options), then its
        answer as the JSON-ready dict the front sends."""
        inf = float("inf")
        traces = self.engine.classify_grouped(
            [it.x for it in items], [it.opts for it in items],
            [inf if it.deadline_at is None else it.deadline_at for it in items],
            [inf if it.budget_at is None else it.budget_at for it in items])
        results = self.engine.results(traces, [it.opts for it in items],
                                      [it.trajectory for it in items])
        metrics.observe(self.engine.backend, [(t, it.opts, res) for it, t, res
                                              in zip(items, traces, results, strict=True)])
        return [res.model_dump(mode="json") for res in results]
