"""The service's micro-batcher and the model runner behind it, in-process (no HTTP).

Calls queued while the model is busy share the next model call; each caller gets its own answers,
in order; per-item options and deadlines stay per item; a failing call fails only its own
callers. The model is held busy with an event, never with sleeps, so nothing here is timed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest


def _gated(calls: list[list], gate: threading.Event, entered: threading.Event):
    """A model that records each call's items and waits at `gate` on its first call."""

    def run(items: list) -> list:
        calls.append(list(items))
        if len(calls) == 1:
            entered.set()
            gate.wait(30)
        return [("answer", it) for it in items]

    return run


def test_jobs_queued_while_busy_share_one_call_and_keep_their_order():
    from deqguard.serving.batcher import MicroBatcher

    calls: list[list] = []
    gate, entered = threading.Event(), threading.Event()
    batches: list[int] = []
    b = MicroBatcher(_gated(calls, gate, entered), max_batch=8, on_batch=batches.append)

    async def main() -> list:
        first = asyncio.ensure_future(b.submit(["a0"]))
        await asyncio.to_thread(entered.wait, 30)  # the model is busy with the first job
        jobs = [asyncio.ensure_future(b.submit([f"j{i}-{k}" for k in range(i + 1)]))
                for i in range(3)]
        await asyncio.sleep(0)  # all three queued before the model is free
        gate.set()
        return [await first] + [await j for j in jobs]

    answers = asyncio.run(main())
    b.close()
    assert calls[0] == ["a0"]
    assert calls[1] == ["j0-0", "j1-0", "j1-1", "j2-0", "j2-1", "j2-2"]  # one call, in order
    assert len(calls) == 2 and batches == [1, 6]
    assert answers[0] == [("answer", "a0")]
    for i, got in enumerate(answers[1:]):
        assert got == [("answer", f"j{i}-{k}") for k in range(i + 1)]


def test_a_job_that_does_not_fit_waits_for_the_next_call_and_a_large_one_is_sliced():
    from deqguard.serving.batcher import MicroBatcher

    calls: list[list] = []
    gate, entered = threading.Event(), threading.Event()
    b = MicroBatcher(_gated(calls, gate, entered), max_batch=4)

    async def main() -> list:
        first = asyncio.ensure_future(b.submit(["x"]))
        await asyncio.to_thread(entered.wait, 30)
        small = asyncio.ensure_future(b.submit(["s0", "s1", "s2"]))
        big = asyncio.ensure_future(b.submit([f"b{k}" for k in range(6)]))
        await asyncio.sleep(0)
        gate.set()
        return [await first, await small, await big]

    _, small, big = asyncio.run(main())
    b.close()
    assert calls[1] == ["s0", "s1", "s2"]  # the big job did not fit beside it
    assert calls[2:] == [["b0", "b1", "b2", "b3"], ["b4", "b5"]]  # over max_batch: sliced
    assert [a[1] for a in big] == [f"b{k}" for k in range(6)]
    assert [a[1] for a in small] == ["s0", "s1", "s2"]


def test_a_failing_call_fails_its_callers_only_and_the_batcher_keeps_serving():
    from deqguard.serving.batcher import MicroBatcher

    def run(items: list) -> list:
        if "boom" in items:
            raise ValueError("model failed")
        return [it.upper() for it in items]

    b = MicroBatcher(run, max_batch=8)

    async def main() -> tuple:
        with pytest.raises(ValueError, match="model failed"):
            await b.submit(["boom"])
        return await b.submit(["ok"]), await b.submit([])

    assert asyncio.run(main()) == (["OK"], [])
    b.close()


def test_a_caller_that_went_away_does_not_stop_the_batcher():
    from deqguard.serving.batcher import MicroBatcher

    calls: list[list] = []
    gate, entered = threading.Event(), threading.Event()
    b = MicroBatcher(_gated(calls, gate, entered), max_batch=8)

    async def main() -> list:
        gone = asyncio.ensure_future(b.submit(["gone"]))
        await asyncio.to_thread(entered.wait, 30)
        gone.cancel()  # a client that disconnected while its image was being solved
        gate.set()
        return await b.submit(["next"])

    assert asyncio.run(main()) == [("answer", "next")]
    b.close()


def test_preparation_runs_on_the_compute_thread_first_and_its_failure_is_kept():
    from deqguard.serving.batcher import MicroBatcher

    seen: list[str] = []

    def prepare() -> None:
        seen.append(threading.current_thread().name)
        raise RuntimeError("warm-up failed")

    b = MicroBatcher(lambda items: [threading.current_thread().name for _ in items],
                     max_batch=2, prepare=prepare, name="compute-test")
    assert asyncio.run(b.submit([1])) == ["compute-test"]  # jobs are still served
    assert seen == ["compute-test"] and isinstance(b.failed, RuntimeError)
    b.close()


# -- the model runner: the engine behind the batcher -------------------------------------------

def _same(a: dict, b: dict) -> None:
    """The same answer, floats up to 1e-6 (as tests/test_serving_http.py compares them)."""
    for key in ("probabilities", "entropy", "residual"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)
    plain = ("probabilities", "entropy", "residual", "detection", "selective")
    assert {k: v for k, v in a.items() if k not in plain} == \
        {k: v for k, v in b.items() if k not in plain}
    np.testing.assert_allclose(a["detection"]["score"], b["detection"]["score"], atol=1e-6)


@pytest.fixture(scope="module")
def runner_and_engine(tiny_checkpoint):
    from deqguard.serving.runner import ModelRunner
    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)
    runner = ModelRunner(engine, threads=1)
    assert runner.batcher.prepared.wait(120) and runner.ready and runner.failed is None
    yield runner, engine
    runner.close()


def test_runner_answers_mixed_options_and_deadlines_as_each_alone(runner_and_engine,
                                                                  pattern_data):
    """One model call holding items of several options and a passed deadline: every answer is
    the one its item gets alone, and only the item whose deadline passed stops early."""
    from deqguard.serving.runner import Item

    runner, engine = runner_and_engine
    x, _ = pattern_data
    variants = [engine.resolve(max_iter=9, tol=1e-9, settle_iters=0),
                engine.resolve(max_iter=5, solver="naive", settle_iters=0),
                engine.resolve(max_iter=12, solver="broyden", settle_iters=0)]
    items = [Item(x[i], variants[i % 3], trajectory=i % 2 == 0) for i in range(6)]
    items.append(Item(x[6], variants[0], deadline_at=time.time() - 1))  # already passed
    items.append(Item(x[7], variants[0], budget_at=time.time() - 1))  # the server's budget

    calls: list[int] = []
    original = runner.batcher._run

    def counted(batch: list) -> list:
        calls.append(len(batch))
        return original(batch)

    runner.batcher._run = counted
    try:
        answers = asyncio.run(runner.answer(items))
    finally:
        runner.batcher._run = original
    assert calls == [len(items)]
    for it, got in zip(items[:6], answers[:6], strict=True):
        _same(got, engine.classify(it.x[None], it.opts, it.trajectory)[0].model_dump(mode="json"))
    assert (answers[6]["stopped"], answers[6]["iterations"]) == ("deadline", 1)
    assert (answers[7]["stopped"], answers[7]["iterations"]) == ("budget", 1)


def test_runner_batches_concurrent_requests_and_answers_each_its_own(runner_and_engine,
                                                                    pattern_data):
    """Requests submitted while the model is busy come back in their own order, equal to the
    answers each gets alone, whatever call they shared."""
    from deqguard.serving.runner import Item

    runner, engine = runner_and_engine
    x, _ = pattern_data
    opts = [engine.resolve(max_iter=2 + i, tol=1e-9, settle_iters=0) for i in range(4)]
    reqs = [[Item(x[(3 * r + k) % len(x)], opts[r % 4]) for k in range(1 + r % 3)]
            for r in range(12)]
    gate, entered = threading.Event(), threading.Event()
    original = runner.batcher._run
    sizes: list[int] = []

    def held(batch: list) -> list:
        sizes.append(len(batch))
        if len(sizes) == 1:
            entered.set()
            gate.wait(30)
        return original(batch)

    runner.batcher._run = held

    async def main() -> list:
        first = asyncio.ensure_future(runner.answer(reqs[0]))
        await asyncio.to_thread(entered.wait, 30)
        rest = [asyncio.ensure_future(runner.answer(r)) for r in reqs[1:]]
        await asyncio.sleep(0)
        gate.set()
        return [await first] + [await f for f in rest]

    try:
        got = asyncio.run(main())
    finally:
        runner.batcher._run = original
    assert sizes[0] == len(reqs[0]) and sizes[1] == sum(len(r) for r in reqs[1:])
    for req, answers in zip(reqs, got, strict=True):
        assert len(answers) == len(req)
        want = engine.classify(np.stack([it.x for it in req]), req[0].opts)
        for a, w in zip(answers, want, strict=True):
            _same(a, w.model_dump(mode="json"))
