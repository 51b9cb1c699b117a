"""Checkpoints in the BentoML model store: push, load and serve by tag, export/import, tampering,
and Bentos that carry the pushed model.

Every store operation runs in a subprocess with its own BENTOML_HOME (temporary), as a user runs
the CLI: BentoML fixes its home once per process, so in-process calls could touch ~/bentoml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEQGUARD_CHECKPOINT"}
    return {**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _run(args: list[str], home: Path, *, check: bool = True, cwd: Path | None = None,
         timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=_env(home, **extra), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _deqguard(*args: str, home: Path, **kw) -> subprocess.CompletedProcess:
    return _run([PY, "-m", "deqguard.cli", *args], home, **kw)


def _bentoml(*args: str, home: Path, **kw) -> subprocess.CompletedProcess:
    return _run([PY, "-m", "bentoml", *args], home, **kw)


def _python(code: str, home: Path, **kw) -> subprocess.CompletedProcess:
    return _run([PY, "-c", code], home, **kw)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml-home")


@pytest.fixture(scope="module")
def pushed(tiny_checkpoint, home) -> str:
    """The fixture checkpoint pushed into `home`; its tag."""
    out = _deqguard("models", "push", str(tiny_checkpoint), home=home)
    tag = out.stdout.strip()
    assert tag.startswith("deqguard-tiny-test:"), out.stdout + out.stderr
    return tag


def _stored_file(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version / "checkpoint.safetensors"


def test_push_stores_the_file_and_its_metadata(tiny_checkpoint, home, pushed):
    from deqguard.models import read_metadata

    meta = read_metadata(tiny_checkpoint)
    assert _stored_file(home, pushed).read_bytes() == tiny_checkpoint.read_bytes()
    info = json.loads(_bentoml("models", "get", pushed, "-o", "json", home=home).stdout)
    assert info["module"] == "deqguard"
    assert info["labels"]["checkpoint"] == "tiny-test"
    assert info["labels"]["classes"] == "4"
    md = info["metadata"]
    assert md["sha256"] == meta.sha256
    assert md["classes"] == meta.classes
    assert md["training"]["command"] == "tests/conftest.py::tiny_checkpoint"
    assert md["metrics"] == meta.metrics
    listed = json.loads(_deqguard("models", "list", "--json", home=home).stdout)
    assert [m["tag"] for m in listed] == [pushed]


def test_push_name_override_and_invalid_name(tiny_checkpoint, tmp_path):
    h = tmp_path / "home"
    tag = _deqguard("models", "push", str(tiny_checkpoint), "--name", "my-model",
                    home=h).stdout.strip()
    assert tag.startswith("my-model:")
    bad = _deqguard("models", "push", str(tiny_checkpoint), "--name", "My Model", home=h,
                    check=False)
    assert bad.returncode == 2 and "not a valid model name" in bad.stderr


def test_push_refuses_what_loading_refuses(tiny_checkpoint, tmp_path):
    broken = tmp_path / "flip.safetensors"
    data = bytearray(tiny_checkpoint.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    h = tmp_path / "home"
    proc = _deqguard("models", "push", str(broken), home=h, check=False)
    assert proc.returncode == 2
    assert "sha256" in proc.stderr and "altered or corrupted" in proc.stderr
    assert json.loads(_deqguard("models", "list", "--json", home=h).stdout) == []


def test_tag_loads_the_same_model_as_the_path(tiny_checkpoint, home, pushed):
    name = pushed.split(":")[0]
    code = f"""
import json, torch
from deqguard.models import load_checkpoint, resolve_checkpoint
a, ma = load_checkpoint({str(tiny_checkpoint)!r}, device="cpu")
out = {{}}
for tag in ({pushed!r}, "{name}:latest"):
    b, mb = load_checkpoint(tag, device="cpu")
    same = all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    out[tag] = [same, mb.sha256 == ma.sha256, str(resolve_checkpoint(tag))]
print(json.dumps(out))
"""
    out = json.loads(_python(code, home).stdout)
    for same, same_hash, path in out.values():
        assert same and same_hash
        assert path == str(_stored_file(home, pushed))


def test_unknown_tag_names_every_place_tried(home):
    proc = _deqguard("info", "deqguard-nothing:latest", home=home, check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "checkpoint not found: 'deqguard-nothing:latest' is not a file" in err
    assert "shipped name (default, regulated-e15)" in err and "BentoML model store" in err


def test_tampered_stored_file_is_refused(tiny_checkpoint, home, pushed, tmp_path):
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    stored = _stored_file(copy, pushed)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01  # a tensor byte: the header (and the hash it records) is intact
    stored.write_bytes(bytes(data))
    code = f"""
from deqguard.models import CheckpointError, load_checkpoint
try:
    load_checkpoint({pushed!r}, device="cpu")
except CheckpointError as exc:
    print(exc)
"""
    msg = _python(code, copy).stdout
    assert "sha256 of the tensors" in msg and "altered or corrupted" in msg
    assert str(stored) in msg
    # Another valid checkpoint in its place: its own hash holds, the store's record does not.
    shutil.copyfile(REPO / "models" / "weights" / "default.safetensors", stored)
    msg = _python(code, copy).stdout
    assert "the model store recorded" in msg and "altered or replaced" in msg


def _answers(url: str, x: np.ndarray) -> list[dict]:
    r = httpx.post(url + "/classify_tensor", json={"tensor": x.tolist()}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_export_import_then_serve_by_tag_answers_as_by_path(served_url, pushed, home, tmp_path,
                                                            pattern_data):
    from serving_server import serve

    archive = tmp_path / "tiny.bentomodel"
    _bentoml("models", "export", pushed, str(archive), home=home)
    fresh = tmp_path / "imported-home"
    _bentoml("models", "import", str(archive), home=fresh)
    assert _stored_file(fresh, pushed).is_file()

    x = pattern_data[0][:6]
    by_path = _answers(served_url, x)
    # serve(..., BENTOML_HOME=...) replaces the throw-away home serving.launch would make.
    with serve(pushed, tmp_path / "server.log", BENTOML_HOME=str(fresh)) as url:
        by_tag = _answers(url, x)
        model = httpx.get(url + "/model", timeout=60).json()
    assert model["name"] == "tiny-test"
    assert by_tag == by_path


def _repo_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and new files), without .venv or builds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def bento(pushed, home, tmp_path_factory) -> str:
    """`make bento` (without its setup step) with DEQGUARD_CHECKPOINT=the pushed tag; the tag
    of the Bento it built, in `home`. Runs the real Makefile on a copy of the tree, offline."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    work = _repo_copy(tmp_path_factory.mktemp("repo"))
    bin_dir = str(Path(PY).parent)
    _run(["make", "-o", "setup", "bento", f"BIN={bin_dir}"], home, cwd=work, timeout=600,
         DEQGUARD_CHECKPOINT=pushed, PIP_NO_INDEX="1")
    bentos = json.loads(_bentoml("list", "-o", "json", home=home).stdout)
    assert len(bentos) == 1
    return bentos[0]["tag"]


def test_make_bento_carries_the_pushed_model(bento, pushed, home, tmp_path):
    info = json.loads(_bentoml("get", bento, "-o", "json", home=home).stdout)
    models = {m["tag"] for s in info["services"] for m in s.get("models", [])}
    assert models == {pushed}
    assert info["args"] == {"checkpoint": pushed}
    # The exported Bento holds the model itself: imported into an empty home, it is there.
    archive = tmp_path / "deqguard.bento"
    _bentoml("export", bento, str(archive), home=home)
    fresh = tmp_path / "fresh-home"
    _bentoml("import", str(archive), home=fresh)
    assert _stored_file(fresh, pushed).read_bytes() == _stored_file(home, pushed).read_bytes()


def test_bento_serves_its_model_without_the_original(bento, pushed, home, tmp_path,
                                                      tiny_checkpoint, pattern_data):
    """The Bento, exported and imported into an empty home, serves the pushed model: neither
    the checkpoint's path nor the original store is used (a different DEQGUARD_CHECKPOINT in
    the environment loses to the Bento's own argument)."""
    from deqguard.serving.launch import _stop, start_on_free_port

    archive = tmp_path / "deqguard.bento"
    _bentoml("export", bento, str(archive), home=home)
    fresh = tmp_path / "fresh-home"
    _bentoml("import", str(archive), home=fresh)
    env = _env(fresh, DEQGUARD_CHECKPOINT="default", DEQGUARD_THREADS="1")
    proc, url = start_on_free_port(
        lambda port: [PY, "-m", "bentoml", "serve", bento, "--host", "127.0.0.1",
                      "--port", str(port)],
        env=env, cwd=tmp_path, log_path=tmp_path / "bento.log", timeout=240)
    try:
        model = httpx.get(url + "/model", timeout=60).json()
        answers = _answers(url, pattern_data[0][:2])
    finally:
        _stop(proc)
    assert model["name"] == "tiny-test"
    assert answers[0]["model"]["name"] == "tiny-test"
