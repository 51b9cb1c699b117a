"""bench/device_finish.sh, run on the CPU: stopped at its training deadline it evaluates nothing;
called again it finishes the run from its resume state, evaluates it with the headline lines and
packs the run, the reports and the logs into one archive."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from test_bench_headline import FAST
from test_training_run import TINY_PRESET, TINY_SETS

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_finish.sh"


def _finish(tmp: Path, data: Path, train_s: int, end_s: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OUT": str(tmp / "out"), "LOGS": str(tmp / "logs"), "DATA": str(data),
           "DEVICE": "cpu", "SERVE": "0", "OMP_NUM_THREADS": "1",
           "HEADLINE_ARGS": "--n-clean 16 --n-attack 8", "EVAL_ARGS": shlex.join(FAST)}
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    argv = [str(SCRIPT), str(tmp / "run"), "2", f"tiny={tmp / 'reports'}", str(train_s),
            str(end_s), "--", "--preset", TINY_PRESET, "--limit", "224", *sets]
    return subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)


def _members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {Path(m.name).name for m in tar.getmembers()}


def test_deadline_then_finish_evaluate_and_pack(pattern_idx_dir, tmp_path):
    # one second is less than the start-up of `deqguard train`: the deadline stops it
    _finish(tmp_path, pattern_idx_dir, train_s=1, end_s=5)
    assert "# exit 124," in (tmp_path / "logs" / "train.log").read_text()
    assert not (tmp_path / "logs" / "headline.log").exists()
    assert not (tmp_path / "reports").exists()

    done = _finish(tmp_path, pattern_idx_dir, train_s=400, end_s=560)
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert '"epoch": 2,' in log and '"event": "final"' in log, done.stderr[-2000:]
    headline = (tmp_path / "logs" / "headline.log").read_text()
    assert headline.count(" exit 0, wall ") == 3 and "| tiny | 2 |" in headline
    assert {p.name for p in (tmp_path / "reports").glob("*.json")} == {
        "clean-budget-n16.json", "whitebox-n8.json", "aa-n8.json"}
    assert not (tmp_path / "logs" / "serve.txt").exists()
    assert {"resume.pt", "best.safetensors", "train_log.jsonl", "train.log", "headline.log",
            "aa-n8.json"} <= _members(tmp_path / "out" / "device.tar.gz")
    assert (tmp_path / "out" / "train.log").is_file()
