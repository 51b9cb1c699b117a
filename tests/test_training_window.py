"""`deqguard window` end to end on the CPU: the device-window script trains the three presets,
evaluates them with the same eval line, and packs what it promises into one archive."""

from __future__ import annotations

import json
import tarfile

from deqguard.cli import main
from deqguard.training.device_window import WINDOW_PRESETS

TINY = ["--epochs", "1", "--limit", "192", "--device", "cpu", "--threads", "1",
        "--set", "data.val_size=64", "--set", "train.batch_size=32", "--set", "eval.val_limit=32",
        "--set", "eval.steps=1", "--set", "eval.test_limit=32", "--set", "solver.max_iter=4",
        "--eval-n", "16", "--aa-n", "2", "--eval-batch-size", "16",
        "--eval-args", "--budgets 1,4 --pgd-steps 2 --intermediate 1:2 --steps-sweep 1,2 "
                       "--eps-sweep 1,4 --paths exact"]


def test_window_trains_evaluates_and_packs_every_preset(pattern_idx_dir, tmp_path, capsys):
    out, archive = tmp_path / "window", tmp_path / "back" / "window.tar.gz"
    rc = main(["window", "--out", str(out), "--data-dir", str(pattern_idx_dir), *TINY,
               "--pack", str(archive)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["presets"]) == set(WINDOW_PRESETS)
    for preset, s in summary["presets"].items():
        assert s["train"]["returncode"] == 0 and s["train"]["epochs_completed"] == 1, preset
        assert "deqguard train --preset " + preset in s["train"]["command"]
        assert s["eval"]["returncode"] == 0 and "deqguard eval" in s["eval"]["command"]
        assert s["eval"]["n"] == 16 and 0.0 <= s["eval"]["clean_accuracy"] <= 1.0
        assert s["eval"]["autoattack_accuracy"] is not None
        assert s["eval"]["worst_case_accuracy"] <= s["eval"]["clean_accuracy"]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "window/summary.json" in names
    for preset in WINDOW_PRESETS:
        assert f"window/runs/{preset}/best.safetensors" in names
        assert f"window/runs/{preset}/train_log.jsonl" in names
        assert f"window/eval/{preset}/eval.json" in names
        assert f"window/eval/{preset}/report/report.md" in names
    assert not any(n.endswith("resume.pt") for n in names)


def test_window_stops_at_its_deadline_and_says_so(pattern_idx_dir, tmp_path, capsys):
    out = tmp_path / "window"
    rc = main(["window", "--out", str(out), "--data-dir", str(pattern_idx_dir), *TINY,
               "--presets", "fashion-wk-regulated", "--deadline-s", "0.5"])
    assert rc == 1  # no checkpoint came out of the window
    s = json.loads((out / "summary.json").read_text())["presets"]["fashion-wk-regulated"]
    assert s["train"]["stopped_at_deadline"] and s["checkpoint"] is None
