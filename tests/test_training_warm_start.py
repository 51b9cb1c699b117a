"""`deqguard train --init`: a run that starts from another checkpoint and says so."""

from __future__ import annotations

import sys

import torch
from test_training_run import tiny_args, tiny_config

from deqguard.cli import main
from deqguard.models import load_checkpoint, read_metadata
from deqguard.training.loop import Trainer


def test_init_loads_the_parent_and_records_its_provenance(pattern_idx_dir, tmp_path, monkeypatch,
                                                          capsys):
    parent_dir = tmp_path / "parent"
    assert main(tiny_args(pattern_idx_dir, parent_dir, epochs=1)) == 0
    parent_path = parent_dir / "last.safetensors"
    parent, parent_meta = load_checkpoint(parent_path, device="cpu")

    cfg = tiny_config(pattern_idx_dir)
    fresh = Trainer(cfg, out_dir=tmp_path / "fresh", argv=["x"])
    warm = Trainer(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"init_from": str(parent_path)})}), out_dir=tmp_path / "warm", argv=["x"])
    want = parent.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in warm.model.state_dict().items())
    assert not all(torch.equal(v, want[k]) for k, v in fresh.model.state_dict().items())

    child_dir = tmp_path / "child"
    args = tiny_args(pattern_idx_dir, child_dir, "--init", str(parent_path), epochs=1)
    monkeypatch.setattr(sys, "argv", ["deqguard", *args])
    assert main(args) == 0
    t = read_metadata(child_dir / "last.safetensors").training
    assert t["config"]["train"]["init_from"] == str(parent_path)
    init = t["init"]
    assert init["sha256"] == parent_meta.sha256 and init["source"] == str(parent_path)
    assert init["command"] == parent_meta.training["command"]
    assert init["epochs_completed"] == 1 and init["parent_init"] is None
    assert init["metrics"]["test_clean_accuracy"] == parent_meta.metrics["test_clean_accuracy"]
    capsys.readouterr()


def test_init_refuses_another_architecture_and_a_missing_file(pattern_idx_dir, tmp_path, capsys):
    parent_dir = tmp_path / "parent"
    assert main(tiny_args(pattern_idx_dir, parent_dir, epochs=1)) == 0
    wider = tiny_args(pattern_idx_dir, tmp_path / "wide", "--init",
                      str(parent_dir / "last.safetensors"), "--set", "model.overrides.width=16",
                      epochs=1)
    assert main(wider) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "width: 8 -> 16" in err
    assert not (tmp_path / "wide" / "last.safetensors").exists()
    missing = tiny_args(pattern_idx_dir, tmp_path / "none", "--init", str(tmp_path / "nope.st"),
                        epochs=1)
    assert main(missing) == 2
    assert "not found" in capsys.readouterr().err


def test_an_unbuildable_model_is_a_clear_error(pattern_idx_dir, tmp_path, capsys):
    args = tiny_args(pattern_idx_dir, tmp_path / "odd", "--set", "model.overrides.width=6",
                     epochs=1)
    assert main(args) == 2
    assert "cannot build the model" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_parent_from_the_resume_state(pattern_idx_dir, tmp_path):
    """The parent is read once, at the start: replacing its file later changes nothing."""
    parent_dir, other_dir = tmp_path / "parent", tmp_path / "other"
    assert main(tiny_args(pattern_idx_dir, parent_dir, epochs=1)) == 0
    assert main(tiny_args(pattern_idx_dir, other_dir, "--seed", "1", epochs=1)) == 0
    parent_path = tmp_path / "parent.safetensors"
    parent_path.write_bytes((parent_dir / "last.safetensors").read_bytes())
    sha = read_metadata(parent_path).sha256
    child = tmp_path / "child"
    assert main(tiny_args(pattern_idx_dir, child, "--init", str(parent_path), epochs=1)) == 0
    parent_path.write_bytes((other_dir / "last.safetensors").read_bytes())
    assert read_metadata(parent_path).sha256 != sha
    cfg = tiny_config(pattern_idx_dir)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"init_from": str(parent_path), "epochs": 1})})
    resumed = Trainer(cfg, out_dir=child, resume=True, argv=["x"])
    assert resumed.init["sha256"] == sha
    trained = load_checkpoint(child / "last.safetensors", device="cpu")[0].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in resumed.model.state_dict().items())
