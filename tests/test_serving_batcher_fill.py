"""The micro-batcher's wait to fill a call (batcher.py): closed-loop clients fall into cohorts,
and a free model waits for the demand its last call saw, never for a lone caller, never for
a caller with a deadline.

The model is held busy with an event. A wait is never longer than the previous call took, so the
batcher's clock is made to jump an hour during the first call: a wrong wait for company would
then last the 30 s cap, long past the few milliseconds a caller's next request takes, and a
missing wait (or a wait where none is due) shows in which items share a call, whatever the
machine's load. Nothing is asserted about time.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest


class _JumpingClock:
    """`time` for the batcher module: monotonic, plus an offset the test can advance."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def _gated(calls: list[list], gate: threading.Event, entered: list[threading.Event],
           clock: _JumpingClock):
    """A model that records each call's items and tells `entered[i]` when call i begins; its
    first call waits at `gate` while its clock jumps an hour (so that call seems to have taken
    an hour)."""

    def run(items: list) -> list:
        calls.append(list(items))
        if len(calls) <= len(entered):
            entered[len(calls) - 1].set()
        if len(calls) == 1:
            gate.wait(30)
            clock.offset += 3600.0
        return [("answer", it) for it in items]

    return run


def _two_cohorts(monkeypatch: pytest.MonkeyPatch, a1_after_second_call: bool = False,
                 **kwargs) -> tuple[list[list], list]:
    """Cohort A's request `a0` holds the model busy while cohort B's three queue; then A sends
    its next request `a1` (once the model's second call has begun, or 10 s have passed, if
    `a1_after_second_call`). Returns the model's calls and the answers to a1, b0..b2."""
    from deqguard.serving import batcher

    clock = _JumpingClock()
    monkeypatch.setattr(batcher, "time", clock)
    calls: list[list] = []
    gate, entered = threading.Event(), [threading.Event(), threading.Event()]
    b = batcher.MicroBatcher(_gated(calls, gate, entered, clock), max_batch=8, max_wait_s=30.0,
                             **kwargs)

    async def main() -> list:
        first = asyncio.ensure_future(b.submit(["a0"]))
        await asyncio.to_thread(entered[0].wait, 30)
        others = [asyncio.ensure_future(b.submit([f"b{i}"])) for i in range(3)]
        while b._queued < 3:  # the three are queued behind the busy model
            await asyncio.sleep(0.01)
        gate.set()
        await first
        if a1_after_second_call:
            await asyncio.to_thread(entered[1].wait, 10)
        again = await b.submit(["a1"])  # the first caller's next request
        return [again] + [await o for o in others]

    try:
        return calls, asyncio.run(main())
    finally:
        b.close()


def test_a_free_model_waits_for_the_demand_its_last_call_saw_so_cohorts_merge(monkeypatch):
    """Closed-loop clients split into cohorts: while the model answers one, the other queues,
    and without waiting every call would hold half the traffic. The first call saw 1 + 3 items
    in flight, so the next one waits for the 4th (its caller's next request) instead of
    running the 3 queued alone."""
    calls, answers = _two_cohorts(monkeypatch)
    assert calls[1] == ["b0", "b1", "b2", "a1"] and len(calls) == 2
    assert answers == [[("answer", "a1")]] + [[("answer", f"b{i}")] for i in range(3)]


def test_a_caller_without_patience_is_not_kept_waiting_for_company(monkeypatch):
    """The same cohorts as above, but one queued item may not wait (a caller's deadline): the
    next call runs the queued three at once instead of waiting for the 4th. `a1` is sent once
    that call has begun, so it cannot join it by arriving early; a call that waited for company
    (30 s after the hour-long first call) would take it in after the 10 s bail-out."""
    calls, _ = _two_cohorts(monkeypatch, a1_after_second_call=True,
                            patience=lambda items: 0.0 if "b1" in items else float("inf"))
    assert calls[1:] == [["b0", "b1", "b2"], ["a1"]]


def test_runner_patience_none_with_a_deadline_and_until_the_earliest_budget():
    from deqguard.serving.options import SolveOptions
    from deqguard.serving.runner import Item, patience

    x = np.zeros((1, 4, 4), np.float32)
    opts = SolveOptions(max_iter=5, tol=1e-3, solver="naive")
    now = time.time()
    assert patience([Item(x, opts)]) == float("inf")
    assert patience([Item(x, opts), Item(x, opts, deadline_at=now + 60)]) == 0.0
    left = patience([Item(x, opts, budget_at=now + 60), Item(x, opts, budget_at=now + 30)])
    assert 0 < left <= 30


def test_a_lone_caller_never_waits_for_company_and_negative_waits_are_refused():
    """Demand 1 (one caller at a time) means a full batch: the 30 s cap is never waited, so
    this finishes at once."""
    from deqguard.serving.batcher import MicroBatcher

    calls: list[list] = []
    b = MicroBatcher(lambda items: calls.append(list(items)) or list(items), max_batch=8,
                     max_wait_s=30.0)

    async def main() -> list:
        return [await b.submit([i]) for i in range(5)]

    assert asyncio.run(main()) == [[i] for i in range(5)]
    assert calls == [[i] for i in range(5)]
    b.close()
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda items: items, max_batch=2, max_wait_s=-1)
