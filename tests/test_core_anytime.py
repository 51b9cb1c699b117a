"""Anytime stops in the solve path: the settled exit and per-sample deadlines, with `stopped`."""

from __future__ import annotations

import time

import pytest
import torch

from deqguard.models.anytime import SettleRule
from deqguard.models.solvers import STOP_REASONS, get_solver


@pytest.mark.parametrize("name", ["naive", "anderson", "broyden"])
def test_a_deadline_stops_only_its_own_sample(name):
    f = lambda z: 0.9 * z + 1.0  # noqa: E731
    z0 = torch.zeros(3, 4)
    solve = get_solver(name)
    past = torch.tensor([time.time() - 1, float("inf"), float("inf")], dtype=torch.float64)
    out = solve(f, z0, max_iter=12, tol=1e-12, deadline=past)
    ref = solve(f, z0[1:], max_iter=12, tol=1e-12)
    assert STOP_REASONS[int(out.stopped[0])] == "deadline" and int(out.iterations[0]) == 1
    assert out.stopped[1:].tolist() == ref.stopped.tolist()
    assert out.iterations[1:].tolist() == ref.iterations.tolist()
    torch.testing.assert_close(out.z[1:], ref.z, rtol=0, atol=0)


def test_stop_when_marks_samples_settled_after_their_step():
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    calls = []

    def stop_when(t, z_t, active):
        calls.append(t)
        return torch.tensor([t >= 2, False])

    out = get_solver("naive")(f, torch.zeros(2, 3), max_iter=5, tol=1e-12, stop_when=stop_when)
    assert [STOP_REASONS[i] for i in out.stopped] == ["settled", "max_iter"]
    assert out.iterations.tolist() == [2, 5] and not out.converged.any()


def test_tol_keeps_its_reason():
    out = get_solver("naive")(lambda z: 0.1 * z + 1.0, torch.zeros(2, 3), max_iter=50, tol=1e-3)
    assert [STOP_REASONS[i] for i in out.stopped] == ["tol", "tol"] and out.converged.all()


def test_settle_rule_on_a_model(tiny_model, pattern_data):
    x = torch.from_numpy(pattern_data[0][:8])
    with torch.inference_mode():
        plain = tiny_model.solve(x, max_iter=30, tol=1e-9)
        loose = tiny_model.solve(x, max_iter=30, tol=1e-9, settle=SettleRule(1, 100.0))
        ruled = tiny_model.solve(x, max_iter=30, tol=1e-9, settle=SettleRule(3, 100.0))
    assert plain.stopped.tolist() == [0] * 8 and plain.iterations.tolist() == [30] * 8
    assert loose.iterations.tolist() == [1] * 8
    assert all(STOP_REASONS[i] == "settled" for i in loose.stopped)
    assert ruled.entropy is not None and ruled.entropy.shape[0] == int(ruled.iterations.max())
    # a settled sample answers with the iterate it stopped at: the plain solve passed through it
    for i, it in enumerate(ruled.iterations.tolist()):
        torch.testing.assert_close(ruled.entropy[it - 1, i], plain.entropy[it - 1, i])
    with pytest.raises(ValueError):
        SettleRule(0, 0.1)


def test_serving_names_the_stop_reasons_in_the_solvers_order():
    # the wire schema (torch-free) and the solvers read the one tuple in deqguard.solve_rules
    from typing import get_args

    from deqguard.serving.schema import StopReason
    from deqguard.solve_rules import STOP_REASONS as RULES

    assert STOP_REASONS is RULES and get_args(StopReason) == STOP_REASONS
