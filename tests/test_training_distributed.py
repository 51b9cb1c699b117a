"""Data-parallel training under torchrun with the gloo backend on CPU (2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_run import tiny_args

from deqguard.models import read_metadata


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(pattern_idx_dir, tmp_path):
    """Two gloo processes, each on half of every batch; the trainer checks at the end that both
    hold identical parameters (it raises otherwise), and rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = tiny_args(pattern_idx_dir, out, epochs=1)
    args[args.index("train.batch_size=16")] = "train.batch_size=8"  # per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                           "deqguard.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(out / "last.safetensors")
    assert meta.training["world_size"] == 2
    assert meta.metrics["val_images"] == 32  # both shards of the validation set counted
