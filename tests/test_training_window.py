"""`deqguard window` end to end on the CPU: the device-window script trains the three presets,
evaluates them with the same eval line, and packs what it promises into one archive."""

from __future__ import annotations

import argparse
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


def test_equal_budget_plan_builds_each_runs_own_command_longest_first(tmp_path, capsys):
    out = tmp_path / "window"
    rc = main(["window", "--out", str(out), "--plan", "equal-budget", "--serve-bench",
               "--device", "cpu", "--data-dir", "d", "--set", "train.batch_size=512",
               "--dry-run"])
    assert rc == 0
    cmds = json.loads(capsys.readouterr().out)
    assert not out.exists() or not any(out.iterdir())  # a dry run runs nothing
    train = cmds["train"]
    assert list(train) == ["fashion-wk-regulated-x2", "fashion-wk-regulated",
                           "fashion-wk-plain", "fashion-cnn-wk", "fashion-cnn-wk-ema"]
    expect = {"fashion-wk-regulated-x2": ("fashion-wk-regulated", "optim.lr=1.6e-2"),
              "fashion-wk-regulated": ("fashion-wk-regulated", "optim.lr=1.6e-2"),
              "fashion-wk-plain": ("fashion-wk-plain", "optim.lr=1.6e-2"),
              "fashion-cnn-wk": ("fashion-cnn-wk", "optim.lr=1.0e-2"),
              "fashion-cnn-wk-ema": ("fashion-cnn-wk", "optim.lr=1.0e-2")}
    for name, (preset, lr) in expect.items():
        cmd = train[name]
        assert cmd.startswith(f"deqguard train --preset {preset} --out {out}/runs/{name} ")
        assert "--resume" in cmd and "--epochs 100 " in cmd and f"--set {lr}" in cmd
        assert cmd.endswith("--set train.batch_size=512")  # the window's --set comes last
        assert ("--set model.overrides.expansion=2" in cmd) == name.endswith("-x2")
        # the finished anchor keeps its command; every other run keeps a weight average
        assert ("--set train.ema_decay=0.999" in cmd) == (name != "fashion-cnn-wk")
        assert cmds["eval"][name].startswith(f"deqguard eval {out}/runs/{name}/best.safetensors")
    serve = cmds["serve"]["serve"]
    assert "bench/cuda_serve.py --checkpoint default --device cpu" in serve
    assert f"--json {out}/serve/serve.json --data-dir d" in serve


def test_capacity_plan_trains_both_models_twice_as_wide_at_their_rates(tmp_path, capsys):
    out = tmp_path / "window"
    assert main(["window", "--out", str(out), "--plan", "capacity", "--device", "cpu",
                 "--dry-run"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert list(train) == ["fashion-wk-regulated-w2", "fashion-cnn-wk-w2"]  # the DEQ first
    for name, preset, lr in (("fashion-wk-regulated-w2", "fashion-wk-regulated", "1.6e-2"),
                             ("fashion-cnn-wk-w2", "fashion-cnn-wk", "5e-3")):
        cmd = train[name]
        assert cmd.startswith(f"deqguard train --preset {preset} --out {out}/runs/{name} ")
        for s in ("--epochs 100 ", f"--set optim.lr={lr} ",
                  "--set 'model.overrides.channels=[32,64]' ", "--set model.overrides.hidden=200 ",
                  "--set train.ema_decay=0.999"):
            assert s in cmd + " ", (name, s)


def test_window_refuses_a_plan_with_presets(tmp_path, capsys):
    rc = main(["window", "--out", str(tmp_path), "--plan", "equal-budget",
               "--presets", "fashion-cnn-wk", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("deqguard window: error: --plan equal-budget")
    assert "Traceback" not in err


def test_window_keeps_the_serve_bench_its_seconds():
    from deqguard.training.device_window import deadlines

    args = argparse.Namespace(deadline_s=600.0, eval_share=0.25, serve_bench=True,
                              serve_bench_s=100.0)
    assert deadlines(1000.0, args) == (1375.0, 1500.0, 1600.0)
    args.serve_bench = False
    assert deadlines(1000.0, args) == (1450.0, 1600.0, 1600.0)


def test_window_ends_with_the_serving_bench_and_packs_resume_state(pattern_idx_dir,
                                                                   tiny_checkpoint, tmp_path,
                                                                   capsys):
    out, archive = tmp_path / "window", tmp_path / "back" / "window.tar.gz"
    rc = main(["window", "--out", str(out), "--data-dir", str(pattern_idx_dir), *TINY,
               "--presets", "fashion-cnn-wk", "--serve-bench",
               "--serve-checkpoint", str(tiny_checkpoint),
               "--serve-args", "--runs 2 --repeats 1 --batches 4 --iterations 5",
               "--pack", str(archive), "--pack-resume"])
    assert rc == 0, capsys.readouterr().err
    serve = json.loads((out / "summary.json").read_text())["serve"]
    assert serve["returncode"] == 0 and "bench/cuda_serve.py" in serve["command"]
    result = serve["result"]
    assert result["device"] == "cpu" and result["checks"]["ok"]
    assert result["latency_batch1"]["fixed_graph"] == "n/a (no CUDA)"
    assert set(result["images_per_second"]) == {"4"}
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"window/serve/serve.json", "window/logs/serve/serve.log",
            "window/runs/fashion-cnn-wk/resume.pt"} <= names
