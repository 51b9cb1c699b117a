"""`deqguard train` end to end on tiny generated data: outputs, metadata, resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deqguard.cli import main
from deqguard.models import load_checkpoint, read_metadata
from deqguard.models.checkpoint import tensor_sha256
from deqguard.training.config import ConfigError, TrainConfig, build_config, preset_names
from deqguard.training.resume import ResumeError
from deqguard.training.seeds import EpochBatches

PRESETS = ["fashion-tiny-pgdat", "fashion-tiny-regulated", "fashion-cnn-pgdat",
           "cifar-large-trades-regulated", "cifar-resnet18-trades"]


# A regulated PGD-AT run of 14 steps per epoch (about a second each epoch).
TINY_PRESET = "fashion-tiny-regulated"
TINY_SETS = ("data.val_size=64", "model.overrides={width: 8, head_width: 16, dropout: 0.1}",
             "train.batch_size=16", "objective.steps=2", "solver.max_iter=4", "eval.val_limit=32",
             "eval.steps=2", "eval.test_limit=64", "train.save_every_steps=3")


def tiny_args(data_dir: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    """The `deqguard train` command line of the tiny run."""
    args = ["train", "--preset", TINY_PRESET, "--data-dir", str(data_dir),
            "--epochs", str(epochs), "--out", str(out), "--no-progress", "--device", "cpu",
            "--limit", "224"]
    for s in TINY_SETS:
        args += ["--set", s]
    return args + list(extra)


def tiny_config(data_dir: Path, *sets: str) -> TrainConfig:
    """The tiny run's config as `build_config` makes it, for tests that drive `Trainer` directly."""
    return build_config(TINY_PRESET, [*TINY_SETS, *sets, f"data.data_dir={data_dir}",
                                      "data.limit=224", "train.device=cpu"])


def test_shipped_presets_validate():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.name == name
    large = build_config("cifar-large-trades-regulated")
    assert (large.objective.kind, large.objective.beta, large.train.batch_size) == ("trades", 6, 96)
    assert large.regulation.enabled and large.solver.solver == "broyden"
    assert large.solver.max_iter == 8 and large.grad.phantom_steps == 5
    assert abs(large.objective.eps - 8 / 255) < 1e-9 and large.objective.steps == 10
    assert build_config("fashion-cnn-pgdat").model.preset == "cnn"


def test_overrides_and_their_errors():
    cfg = build_config("fashion-tiny-pgdat", ["objective.eps=0.2", "model.overrides.width=8",
                                              "regulation.enabled=true"])
    assert cfg.objective.eps == 0.2 and cfg.model.overrides == {"width": 8}
    assert cfg.regulation.enabled
    with pytest.raises(ConfigError, match="objective"):
        build_config("fashion-tiny-pgdat", ["objective.epsilon=0.2"])
    with pytest.raises(ConfigError, match="section.field=value"):
        build_config("fashion-tiny-pgdat", ["objective.eps"])
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("no-such-preset")


def test_epoch_batches_shard_and_resume():
    full = list(EpochBatches(100, 8, seed=1, epoch=0))
    assert len(full) == 12 and all(len(b) == 8 for b in full)
    assert list(EpochBatches(100, 8, seed=1, epoch=0, start=5)) == full[5:]
    assert full != list(EpochBatches(100, 8, seed=1, epoch=1))
    r0 = list(EpochBatches(100, 4, seed=1, epoch=0, rank=0, world_size=2))
    r1 = list(EpochBatches(100, 4, seed=1, epoch=0, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full


def test_train_cli_writes_checkpoints_log_and_metadata(pattern_idx_dir, tmp_path, capsys,
                                                       monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(pattern_idx_dir, out)
    monkeypatch.setattr(sys, "argv", ["deqguard", *args])  # what the console script sees
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} >= {"last.safetensors", "best.safetensors",
                                               "train_log.jsonl", "resume.pt"}
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows[:2]] == [1, 2] and rows[2]["event"] == "final"
    for key in ("train_loss", "train_adv_accuracy", "val_clean_accuracy", "val_pgd_accuracy",
                "train_mean_iterations", "val_mean_iterations", "train_seconds",
                "images_per_second"):
        assert rows[0][key] is not None
    assert 1 <= rows[0]["train_mean_depth"] <= 4
    meta = read_metadata(out / "last.safetensors")
    assert meta.name == "run"  # the output folder's name, not the preset's
    assert rows[0]["val_images"] == 32  # an explicit eval.val_limit wins over --limit
    t = meta.training
    assert t["preset"] == "fashion-tiny-regulated" and t["config"]["regulation"]["enabled"]
    assert t["config"]["solver"] == {"solver": "anderson", "max_iter": 4, "tol": 0.001}
    assert t["config"]["eval"]["eps"] == 0.1  # resolved from the objective
    assert t["argv"] == ["deqguard", *args] and t["command"].startswith("deqguard train --preset")
    assert len(t["data_fingerprint"]) == 64 and t["epochs_completed"] == 2
    m = meta.metrics
    assert {"val_clean_accuracy", "val_pgd_accuracy", "test_clean_accuracy"} <= set(m)
    assert m["test_clean_images"] == 64
    # the recorded test accuracy is what the checkpoint scores (first 64 test images)
    from deqguard.training.data import load_dataset
    model, _ = load_checkpoint(out / "last.safetensors", device="cpu")
    test = load_dataset("fashion-mnist", "test", data_dir=pattern_idx_dir, limit=64)
    x = torch.stack([test[i][0] for i in range(64)])
    y = torch.tensor([test[i][1] for i in range(64)])
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(m["test_clean_accuracy"], abs=1e-9)
    best = read_metadata(out / "best.safetensors").metrics
    assert best["best_epoch"] in (1, 2)
    # a second run into the same folder without --resume is refused
    assert main(tiny_args(pattern_idx_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err


def test_corrupt_and_mismatched_resume_files(pattern_idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(pattern_idx_dir, out, epochs=1)) == 0
    state = (out / "resume.pt").read_bytes()
    # a different configuration
    assert main(tiny_args(pattern_idx_dir, out, "--resume", "--set", "objective.eps=0.2")) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "objective.eps" in err
    # a truncated file
    (out / "resume.pt").write_bytes(state[: len(state) // 2])
    assert main(tiny_args(pattern_idx_dir, out, "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err
    # not a resume file at all
    torch.save({"hello": 1}, out / "resume.pt")
    assert main(tiny_args(pattern_idx_dir, out, "--resume")) == 2
    assert "not a deqguard resume file" in capsys.readouterr().err
    from deqguard.training.config import build_config as bc
    from deqguard.training.loop import Trainer
    (out / "resume.pt").write_bytes(state)
    with pytest.raises(ResumeError, match="different configuration"):
        Trainer(bc("fashion-tiny-regulated", ["data.val_size=64", "data.data_dir=" + str(
            pattern_idx_dir)]), out_dir=out, resume=True)


def _run_cli(args: list[str], **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "deqguard.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# (extra args, environment, epochs, bf16 autocast): fp32, and the bf16 path on any CPU
# (DEQGUARD_CPU_BF16=force: emulated where the CPU has no bf16, so one epoch to stay fast) with
# channels_last on.
RESUME_CASES = {
    "fp32": ((), {"DEQGUARD_CPU_BF16": "off"}, 2, False),
    "bf16-channels-last": (("--set", "train.amp=bf16", "--set", "train.channels_last=true"),
                           {"DEQGUARD_CPU_BF16": "force"}, 1, True),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(pattern_idx_dir, tmp_path, case):
    """Dropout, augmentation, attack noise and random depths all on; killed with SIGKILL after
    the first mid-epoch save, resumed, it must end bit-identical to an uninterrupted run."""
    extra, env, epochs, bf16 = RESUME_CASES[case]

    def args(out: Path, *more: str) -> list[str]:
        return tiny_args(pattern_idx_dir, out, *extra, *more, epochs=epochs)

    ref = _run_cli(args(tmp_path / "ref"), **env)
    killed_out = tmp_path / "killed"
    proc = _run_cli(args(killed_out), **env)
    deadline = time.monotonic() + 120
    while not (killed_out / "resume.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed_out / "resume.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step"] < 14  # really mid-epoch
    resumed = _run_cli(args(killed_out, "--resume"), **env)
    for p in (ref, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for name in ("last.safetensors", "best.safetensors"):
        a = read_metadata(tmp_path / "ref" / name)
        b = read_metadata(killed_out / name)
        assert a.sha256 == b.sha256, name
        assert a.metrics["val_pgd_accuracy"] == b.metrics["val_pgd_accuracy"]
        assert a.training["bf16_autocast"] is b.training["bf16_autocast"] is bf16
    log_a = (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    log_b = (killed_out / "train_log.jsonl").read_text().splitlines()
    assert len(log_a) == len(log_b) == epochs + 1
    for la, lb in zip(log_a, log_b, strict=True):
        ra, rb = json.loads(la), json.loads(lb)
        for k in ("train_loss", "train_adv_accuracy", "val_clean_accuracy", "val_pgd_accuracy"):
            assert ra.get(k) == rb.get(k)
    model, _ = load_checkpoint(killed_out / "last.safetensors", device="cpu")
    assert tensor_sha256(model.state_dict()) == read_metadata(tmp_path / "ref" /
                                                              "last.safetensors").sha256
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {
        torch.float32}  # fp32 master weights, whatever the autocast


def test_train_cli_threads_name_limit_and_summary(pattern_idx_dir, tmp_path, capsys):
    """--threads sets torch's threads, --name names the checkpoints (the preset stays recorded
    apart), --limit caps validation and the test check, and a summary explains the numbers."""
    out = tmp_path / "run"
    args = ["train", "--preset", TINY_PRESET, "--data-dir", str(pattern_idx_dir), "--epochs", "1",
            "--out", str(out), "--no-progress", "--device", "cpu", "--limit", "48",
            "--threads", "1", "--name", "my-smoke"]
    for s in TINY_SETS:  # without the eval limits: --limit decides them here
        if not s.startswith(("eval.val_limit", "eval.test_limit")):
            args += ["--set", s]
    before = torch.get_num_threads()
    # Two threads before, one asked for: the run itself stays on one (this box may be busy).
    torch.set_num_threads(2)
    try:
        assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["val_images"] == 48  # the validation split holds 64
    for name in ("last.safetensors", "best.safetensors"):
        meta = read_metadata(out / name)
        assert meta.name == "my-smoke"
        assert meta.training["preset"] == TINY_PRESET == meta.training["config"]["name"]
        assert meta.training["threads"] == 1
        assert meta.metrics["val_images"] == 48 and meta.metrics["test_clean_images"] == 48
        assert meta.training["config"]["eval"]["val_limit"] == 48
    err = capsys.readouterr().err
    summary = " ".join(err[err.index("deqguard train: run 'my-smoke'"):].split())
    for part in ("validation clean accuracy", "PGD accuracy", "on 48 images",
                 "chance level for 10 classes is 10%", f"deqguard serve {out / 'best.safetensors'}",
                 "named 'my-smoke'", "done: 1 epoch on", "(best epoch 1 of 1)"):
        assert part in summary, part

    # A resumed run keeps the name it started with unless --name says otherwise.
    from deqguard.training.loop import Trainer
    cfg = TrainConfig.model_validate(read_metadata(out / "last.safetensors").training["config"])
    assert Trainer(cfg, out_dir=out, resume=True, argv=["x"]).name == "my-smoke"
    assert Trainer(cfg, out_dir=out, resume=True, argv=["x"], name="renamed").name == "renamed"


def test_limit_caps_validation_and_test_sizes_unless_set(capsys):
    def eval_section(*extra: str) -> dict:
        assert main(["train", "--preset", TINY_PRESET, "--show-config", *extra]) == 0
        return json.loads(capsys.readouterr().out)["eval"]

    preset = eval_section()
    assert preset["val_limit"] == 1000 and preset["test_limit"] == 1000
    capped = eval_section("--limit", "300")
    assert capped["val_limit"] == 300 and capped["test_limit"] == 300
    explicit = eval_section("--limit", "300", "--set", "eval.val_limit=500")
    assert explicit["val_limit"] == 500 and explicit["test_limit"] == 300
    assert eval_section("--limit", "5000")["val_limit"] == 1000  # a cap, never a raise


def test_run_summary_says_when_near_chance_is_expected():
    from deqguard.models import CheckpointMetadata
    from deqguard.training.summary import run_summary

    def summary(clean: float) -> str:
        meta = CheckpointMetadata(
            name="smoke", model={}, input={"channels": 1, "height": 28, "width": 28},
            classes=[str(i) for i in range(10)],
            training={"preset": "fashion-wk-regulated", "epochs_completed": 1,
                      "data": {"train_images": 300}},
            metrics={"best_epoch": 1, "val_clean_accuracy": clean, "val_pgd_accuracy": 0.02,
                     "val_pgd": {"eps": 0.1, "steps": 10}, "val_images": 300,
                     "test_clean_accuracy": clean, "test_clean_images": 300})
        return " ".join(run_summary(meta, "runs/smoke/best.safetensors").split())

    low = summary(0.105)
    assert "clean accuracy 10.5%, PGD accuracy 2.0% on 300 images" in low
    assert "chance level for 10 classes is 10%" in low
    assert "Near chance is expected after a run this short" in low
    assert "not the shipped model" in low and "1 epoch on 300 training images" in low
    high = summary(0.85)
    assert "chance level for 10 classes is 10%" in high and "Near chance" not in high


def test_run_summary_counts_the_epochs_run_not_the_best_checkpoints():
    """A 100-epoch run whose best epoch was 85 once summed itself up as "done: 85 epochs"."""
    from deqguard.models import CheckpointMetadata
    from deqguard.training.summary import run_summary

    best = CheckpointMetadata(
        name="long", model={}, input={"channels": 1, "height": 28, "width": 28},
        classes=[str(i) for i in range(10)],
        training={"preset": "fashion-wk-plain", "epochs_completed": 85,
                  "data": {"train_images": 55000}},
        metrics={"best_epoch": 85, "val_clean_accuracy": 0.86, "val_pgd_accuracy": 0.788,
                 "val_pgd": {"eps": 0.1, "steps": 10}, "val_images": 1000})
    text = " ".join(run_summary(best, "runs/long/best.safetensors", epochs_run=100).split())
    assert "done: 100 epochs on 55,000 training images" in text
    assert "(best epoch 85 of 100)" in text
    alone = " ".join(run_summary(best, "runs/long/best.safetensors").split())
    assert "done: 85 epochs" in alone and "(best epoch 85 of 85)" in alone


def _interrupted_after_one_epoch(monkeypatch, cfg, out: Path, argv: list[str]) -> None:
    """Train `cfg` into `out` until its second epoch starts, then stop it as a kill would."""
    from deqguard.training.loop import Trainer

    real = Trainer.run_epoch
    calls = []

    def run_epoch(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after epoch 1 and its saves
        return real(self)

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, out_dir=out, argv=argv).run()
    monkeypatch.setattr(Trainer, "run_epoch", real)


def test_resumed_run_records_each_invocation_as_a_segment(pattern_idx_dir, tmp_path, monkeypatch):
    """A run started in one place and finished in another (a GPU window, then the CPU) must not
    let the last invocation's device and command stand for every epoch."""
    from deqguard.training.loop import Trainer

    # amp pinned off: `auto` computes in bf16 on a CPU with AMX/AVX512-BF16, fp32 elsewhere
    cfg = tiny_config(pattern_idx_dir, "train.epochs=2", "train.progress=false", "train.amp=off")
    out = tmp_path / "run"
    _interrupted_after_one_epoch(monkeypatch, cfg, out, ["deqguard", "train", "first"])
    first = read_metadata(out / "last.safetensors").training["segments"]
    assert [(s["start_epoch"], s["end_epoch"]) for s in first] == [(0, 1)]
    Trainer(cfg, out_dir=out, resume=True, argv=["deqguard", "train", "second"]).run()
    segs = read_metadata(out / "last.safetensors").training["segments"]
    assert [(s["start_epoch"], s["end_epoch"]) for s in segs] == [(0, 1), (1, 2)]
    assert [s["command"] for s in segs] == ["deqguard train first", "deqguard train second"]
    steps = 224 // 16  # --limit 224 at batch 16
    assert [(s["start_step"], s["end_step"]) for s in segs] == [(0, steps), (steps, 2 * steps)]
    for s in segs:
        assert s["device"] == "cpu" and s["device_name"] and s["precision"] == "fp32"
        assert s["torch_version"] == torch.__version__ and "tf32" not in s
    state = torch.load(out / "resume.pt", weights_only=True)
    assert state["segments"] == segs


def test_a_run_may_resume_in_another_memory_format(pattern_idx_dir, tmp_path, monkeypatch):
    """channels_last picks other kernels, not other arithmetic (like the device): a long run
    may switch to the faster one when resumed, and each segment says which it used."""
    from deqguard.training.loop import Trainer

    cfg = tiny_config(pattern_idx_dir, "train.epochs=2", "train.progress=false")
    out = tmp_path / "run"
    _interrupted_after_one_epoch(monkeypatch, cfg, out, ["deqguard", "train", "first"])
    switched = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"channels_last": True})})
    trainer = Trainer(switched, out_dir=out, resume=True, argv=["deqguard", "train", "second"])
    trainer.run()
    conv = next(p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    segs = read_metadata(out / "last.safetensors").training["segments"]
    assert [(s["end_epoch"], s["channels_last"]) for s in segs] == [(1, False), (2, True)]


def test_resume_state_without_segments_says_its_epochs_are_unrecorded(pattern_idx_dir, tmp_path,
                                                                       monkeypatch):
    """States written before segments were recorded: the epochs they hold are marked unknown,
    not credited to the invocation that resumes them."""
    from deqguard.training.loop import Trainer
    from deqguard.training.resume import save_state

    cfg = tiny_config(pattern_idx_dir, "train.epochs=2", "train.progress=false")
    out = tmp_path / "run"
    _interrupted_after_one_epoch(monkeypatch, cfg, out, ["deqguard", "train", "old"])
    state = torch.load(out / "resume.pt", weights_only=True)
    del state["segments"]
    save_state(out / "resume.pt", {k: v for k, v in state.items()
                                   if k not in ("format", "version")})
    Trainer(cfg, out_dir=out, resume=True, argv=["deqguard", "train", "new"]).run()
    segs = read_metadata(out / "last.safetensors").training["segments"]
    assert segs[0] == {"start_epoch": 0, "end_epoch": 1, "start_step": 0, "end_step": 14,
                       "recorded": False}
    assert (segs[1]["start_epoch"], segs[1]["end_epoch"]) == (1, 2) and len(segs) == 2
    assert segs[1]["command"] == "deqguard train new" and "recorded" not in segs[1]
