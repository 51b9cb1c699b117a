"""bench/train_step.py --count-ops: the operators of one training step, counted by the profiler."""

from __future__ import annotations

import re
import sys

from conftest import load_bench


def test_count_ops_counts_more_operators_for_more_attack_steps(monkeypatch, capsys):
    mod = load_bench("train_step.py")
    counts = {}
    for steps_set in ("objective.steps=1", "objective.steps=3"):
        monkeypatch.setattr(sys, "argv", [
            "train_step.py", "--preset", "fashion-tiny-pgdat", "--channels", "1", "--size", "28",
            "--batch-size", "2", "--precision", "fp32", "--steps", "2", "--warmup", "1",
            "--set", steps_set, "--set", "regulation.enabled=false", "--count-ops"])
        mod.main()
        out = capsys.readouterr().out
        found = re.search(r"aten ops per step \(top level, 2 steps\): min (\d+), median (\d+), "
                          r"max (\d+)", out)
        assert found, out
        lo, mid, hi = map(int, found.groups())
        assert 0 < lo <= mid <= hi
        counts[steps_set] = mid
    # two more PGD steps, each a forward and a backward through the solver: more operators
    assert counts["objective.steps=3"] > counts["objective.steps=1"]
