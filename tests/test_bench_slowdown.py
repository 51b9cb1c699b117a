"""bench/slowdown_http.py's traffic plan and summary (the servers themselves are not started
here: the bench is run by hand, its log committed)."""

from __future__ import annotations

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("slowdown_http.py", "slowdown_http")  # it puts bench/ on sys.path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_plan_sends_the_asked_share_spread_out(bench, seed):
    other = bench.plan("slowdown", 200, 0.2, seed)
    assert sum(other) == 40
    positions = [i for i, o in enumerate(other) if o]
    assert {b - a for a, b in zip(positions, positions[1:], strict=False)} == {5}
    assert not any(bench.plan("clean", 200, 0.2, seed))


def test_summary_compares_each_mix_with_the_clean_only_p99(bench):
    runs = [{"mix": "clean", "lat": {"clean": [0.01] * 99 + [0.02], "other": []},
             "cut": {"clean": 0, "other": 0}, "wall": 1.0, "n": 100},
            {"mix": "slowdown", "lat": {"clean": [0.01] * 78 + [0.05] * 2, "other": [0.1] * 20},
             "cut": {"clean": 4, "other": 10}, "wall": 2.0, "n": 100}]
    out = bench.summarise(runs)
    assert out["clean"]["clean_p99_vs_clean_only"] == pytest.approx(1.0)
    assert out["slowdown"]["clean_p99_ms"] == pytest.approx(50.0)
    assert out["slowdown"]["clean_p99_vs_clean_only"] == pytest.approx(
        50.0 / out["clean"]["clean_p99_ms"])
    assert out["slowdown"]["clean_cut_share"] == pytest.approx(4 / 80)
    assert out["slowdown"]["other_cut_share"] == pytest.approx(0.5)
    assert out["slowdown"]["requests_per_s"] == pytest.approx(50.0)
