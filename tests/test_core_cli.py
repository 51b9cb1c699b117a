"""`deqguard info`: metadata as JSON, and a clear exit 2 on a bad checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deqguard.cli import main
from deqguard.models import read_metadata


def test_info_prints_metadata_json(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = read_metadata(tiny_checkpoint)
    assert out["path"] == str(tiny_checkpoint)
    assert out["name"] == "tiny-test"
    assert out["classes"] == meta.classes
    assert out["model"] == meta.model
    assert out["sha256"] == meta.sha256
    assert out["training"]["command"] == "tests/conftest.py::tiny_checkpoint"
    assert out["input"]["channels"] == 1


def test_info_missing_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "deqguard info: error: checkpoint not found" in err and str(missing) in err


def test_info_console_script(tiny_checkpoint, tmp_path):
    """The installed entry point, in a real process: JSON on success, exit 2 on a text file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "deqguard.cli", "info", str(tiny_checkpoint)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "tiny-test"
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("hello")
    bad = subprocess.run([sys.executable, "-m", "deqguard.cli", "info", str(bogus)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "not a safetensors file" in bad.stderr
    assert "Traceback" not in bad.stderr
