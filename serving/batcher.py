"""A micro-batcher: concurrent requests share one model call, on one dedicated compute thread.

Why not BentoML's adaptive batching: it lives in a second service, so every image crossed a
process hop (pickle, aiohttp, uvicorn, its dispatcher) that cost about 11 ms per request at
c=1 against a 2 ms model call, and under load its dispatcher still sent batches of one or two
(measured, docs/eval/wk/default/bench/ladder-http.txt). Here the batching policy is the one a
model call needs and nothing more: while the compute thread is busy, requests queue; when it is
free, it takes everything queued (up to `max_batch` items) as one call. A lone request never
waits for company, and a busy model always gets the largest batch the traffic offers.

Filling: under steady load, clients fall into cohorts. At c=32 single-image requests, the compute
thread answered 16, and by the time it was free again only the other 16 (sent meanwhile) were
queued: the batches stayed at half the traffic (measured: median 16 at c=32, docs/eval/wk/default/
bench/gap-profile.md), and the default DEQ costs 25% more per image at 16 than at 32, while
the event loop and the compute thread share one GIL, so the loop's work never overlapped the
model's much anyway. So the thread remembers the demand at the end of each call (its items
plus those queued by then) and, when fewer are queued, waits for that many, at most as long as
the last call took (a stale estimate costs one such wait) and at most `max_wait_s`, and never
longer than the queued items' own `patience` allows (a caller with a deadline is not kept
waiting for company). A lone caller's demand is one: it never waits.

One thread does all model work, so the engine's thread pinning and its lock see one caller,
and the event loop stays free to read, validate and decode the next requests meanwhile. A job
(one request's items) is never split across calls unless it alone is over `max_batch`; the
answers come back per job, in item order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T]):
    items: Sequence[T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


_STOP = object()


class MicroBatcher(Generic[T, R]):
    """`await submit(items)` -> `run(batch)`'s answers for those items, where `batch` holds the
    items of every job queued when the compute thread became free (at most `max_batch`, except
    a single larger job, which runs in slices of `max_batch`). When fewer items are queued than
    the previous call's demand, it waits for them first (see the module docstring), at most
    `max_wait_s` (0: never), and at most `patience(items)` seconds for the items taken so far.

    `run` gets a list of items and returns one answer per item, in order; an exception it raises
    fails every job of that call. `prepare` runs first on the compute thread (thread settings,
    warm-up); if it raises, the error is kept in `failed` and jobs are still served. `on_batch`
    is told each call's item count (a metric)."""

    def __init__(self, run: Callable[[list[T]], Sequence[R]], *, max_batch: int,
                 prepare: Callable[[], None] | None = None,
                 on_batch: Callable[[int], None] | None = None, name: str = "batcher",
                 max_wait_s: float = 0.0,
                 patience: Callable[[Sequence[T]], float] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self._run = run
        self.max_batch = int(max_batch)
        self._prepare = prepare
        self._on_batch = on_batch
        self.max_wait_s = float(max_wait_s)
        self._patience = patience
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0  # items submitted and not yet taken into a call
        self._count_lock = threading.Lock()
        self.failed: BaseException | None = None
        self.prepared = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, items: Sequence[T]) -> list[R]:
        """The answers to `items`, in order, once a model call that holds them is done."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(items, loop, loop.create_future())
        with self._count_lock:
            self._queued += len(items)
        self._queue.put(job)
        return await job.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the compute thread --------------------------------------------------------------------
    def _loop(self) -> None:
        if self._prepare is not None:
            try:
                self._prepare()
            except BaseException as exc:  # kept visible: the service reports it (/livez)
                self.failed = exc
                log.exception("%s: preparation failed", self._thread.name)
        self.prepared.set()
        carry: Any = None
        demand, last_call = 0, 0.0
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                return
            jobs, size, stop = [first], len(first.items), False
            target = min(self.max_batch, demand)
            wait_until = time.monotonic() + min(self.max_wait_s, last_call)
            if size < target:
                wait_until = self._patient_until(first.items, wait_until)
            while size < self.max_batch:
                try:
                    left = wait_until - time.monotonic() if size < target else 0.0
                    nxt = (self._queue.get(timeout=left) if left > 0
                           else self._queue.get_nowait())
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if size + len(nxt.items) > self.max_batch:
                    carry = nxt  # first in the next call: arrival order is kept
                    break
                jobs.append(nxt)
                size += len(nxt.items)
                if size < target:
                    wait_until = self._patient_until(nxt.items, wait_until)
            with self._count_lock:
                self._queued -= size
            started = time.monotonic()
            self._call(jobs)
            last_call = time.monotonic() - started
            with self._count_lock:
                demand = size + self._queued
            if stop:
                carry = _STOP

    def _patient_until(self, items: Sequence[T], until: float) -> float:
        if self._patience is None:
            return until
        return min(until, time.monotonic() + self._patience(items))

    def _call(self, jobs: list[_Job[T]]) -> None:
        items = [it for job in jobs for it in job.items]
        try:
            answers: list[R] = []
            for start in range(0, len(items), self.max_batch):
                part = items[start:start + self.max_batch]
                if self._on_batch is not None:
                    self._on_batch(len(part))
                got = list(self._run(part))
                if len(got) != len(part):
                    raise RuntimeError(f"run answered {len(got)} items for {len(part)}")
                answers += got
        except BaseException as exc:
            for job in jobs:
                _deliver(job, None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for job in jobs:
            n = len(job.items)
            _deliver(job, answers[at:at + n], None)
            at += n


def _deliver(job: _Job[Any], result: Any, error: BaseException | None) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:  # its event loop is closed (the server is stopping)
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client gone): nobody waits for it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
