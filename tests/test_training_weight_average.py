"""The weight average beside a run (train.ema_decay): its files, its independence from the run,
and its resumption.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_training_run import _interrupted_after_one_epoch, tiny_args, tiny_config

from deqguard.cli import main
from deqguard.models import load_checkpoint, read_metadata

EMA = ("--set", "train.ema_decay=0.9")


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_the_average_is_saved_validated_and_tested(pattern_idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(pattern_idx_dir, out, *EMA)) == 0
    assert f"  average     {out / 'ema_best.safetensors'} (epoch " in capsys.readouterr().err
    rows = _log(out)
    for row in rows[:2]:
        assert 0 <= row["val_ema_clean_accuracy"] <= 1 and 0 <= row["val_ema_pgd_accuracy"] <= 1
        assert row["val_ema_seconds"] > 0
    assert rows[0]["ema_updates"] == rows[0]["global_step"]
    assert rows[1]["ema_updates"] == rows[1]["global_step"] == 28
    final = rows[-1]
    assert final["event"] == "final" and "ema_test_clean_accuracy" in final
    meta = read_metadata(out / "ema.safetensors")
    assert meta.name == "run-ema"
    assert meta.training["weight_average"]["decay"] == 0.9
    assert meta.training["weight_average"]["start_step"] == 0
    assert meta.training["weight_average"]["updates"] == 28
    assert meta.metrics["val_pgd_accuracy"] == rows[1]["val_ema_pgd_accuracy"]
    best = read_metadata(out / "ema_best.safetensors")
    assert best.metrics["best_epoch"] in (1, 2)
    # a model like any other: deqguard eval and serve load it
    model, _ = load_checkpoint(out / "ema.safetensors", device="cpu")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, len(meta.classes))
    # and not the run's last weights
    last, ema = _tensors(out / "last.safetensors"), _tensors(out / "ema.safetensors")
    assert last.keys() == ema.keys()
    assert any(not torch.equal(last[k], ema[k]) for k in last)


def test_the_average_does_not_change_the_run(pattern_idx_dir, tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert main(tiny_args(pattern_idx_dir, plain)) == 0
    assert main(tiny_args(pattern_idx_dir, averaged, *EMA)) == 0
    a, b = _tensors(plain / "last.safetensors"), _tensors(averaged / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "ema.safetensors").exists()


def test_a_resumed_average_is_the_uninterrupted_one(pattern_idx_dir, tmp_path, monkeypatch):
    from deqguard.training.loop import Trainer

    cfg = tiny_config(pattern_idx_dir, "train.epochs=2", "train.progress=false",
                      "train.ema_decay=0.9")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(cfg, out_dir=whole, argv=["x"]).run()
    _interrupted_after_one_epoch(monkeypatch, cfg, parts, ["x"])
    Trainer(cfg, out_dir=parts, resume=True, argv=["x"]).run()
    a, b = _tensors(whole / "ema.safetensors"), _tensors(parts / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(whole)[1]["val_ema_pgd_accuracy"] == _log(parts)[1]["val_ema_pgd_accuracy"]


def test_an_average_switched_on_mid_run_starts_there(pattern_idx_dir, tmp_path, monkeypatch,
                                                     capsys):
    from deqguard.training.loop import Trainer

    cfg = tiny_config(pattern_idx_dir, "train.epochs=2", "train.progress=false")
    out = tmp_path / "run"
    _interrupted_after_one_epoch(monkeypatch, cfg, out, ["x"])
    later = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ema_decay": 0.9})})
    Trainer(later, out_dir=out, resume=True, argv=["x"]).run()
    assert "the weight average starts at step 14 (epoch 1): the run had none" in \
        capsys.readouterr().err
    average = read_metadata(out / "ema.safetensors").training["weight_average"]
    assert (average["start_step"], average["updates"]) == (14, 14)
    rows = _log(out)
    assert "val_ema_pgd_accuracy" not in rows[0] and "val_ema_pgd_accuracy" in rows[1]
