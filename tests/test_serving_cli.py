"""`deqguard serve` serves the backend it is asked for: by flag, or by DEQGUARD_BACKEND (README:
`DEQGUARD_BACKEND=onnx DEQGUARD_ONNX=model.onnx make serve`), visible in GET /model; and it
refuses a checkpoint or a port the server could not start with in one line, before BentoML."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from deqguard.cli import build_parser, main


def test_the_environment_is_the_flags_default(monkeypatch):
    monkeypatch.setenv("DEQGUARD_BACKEND", "onnx")
    monkeypatch.setenv("DEQGUARD_ONNX", "/models/m.onnx")
    args = build_parser().parse_args(["serve"])
    assert (args.backend, args.onnx) == ("onnx", "/models/m.onnx")
    assert build_parser().parse_args(["serve", "--backend", "torch"]).backend == "torch"
    monkeypatch.delenv("DEQGUARD_BACKEND")
    monkeypatch.delenv("DEQGUARD_ONNX")
    args = build_parser().parse_args(["serve"])
    assert (args.backend, args.onnx) == ("torch", None)


def test_deqguard_serve_with_deqguard_backend_onnx_serves_onnx(tiny_checkpoint, tmp_path):
    from deqguard.serving.launch import start_on_free_port, stop_process_group

    env = {**os.environ, "DEQGUARD_BACKEND": "onnx", "BENTOML_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}
    proc, url = start_on_free_port(
        lambda port: [sys.executable, "-m", "deqguard.cli", "serve", str(tiny_checkpoint),
                      "--port", str(port)],
        env=env, log_path=tmp_path / "serve.log", timeout=240)
    try:
        served = httpx.get(url + "/model", timeout=30).json()["serving"]
        assert served["backend"] == "onnx" and served["solvers"] == ["naive"]
        family = psutil.Process(proc.pid).children(recursive=True)
    finally:
        stop_process_group(proc)
    time.sleep(0.5)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes of the server outlived it: {alive}"


# -- what `deqguard serve` refuses before BentoML starts ------------------------------------------

class _Started(Exception):
    """Raised instead of exec'ing BentoML: the checks let the arguments through."""


@pytest.fixture
def no_bentoml(monkeypatch):
    """Replace the exec into `bentoml serve` by a recorder that stops the handler there."""
    calls = []

    def execve(path, argv, env):
        calls.append((argv, env))
        raise _Started

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("DEQGUARD_CHECKPOINT", raising=False)
    return calls


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deqguard serve: error: "), err
    assert "DEQGUARD_CHECKPOINT" not in err and "--arg" not in err
    return lines[0]


def test_serve_refuses_a_missing_checkpoint_naming_it(tmp_path, capsys, no_bentoml):
    from deqguard.serving.launch import free_port

    missing = tmp_path / "foo.safetensors"
    assert main(["serve", str(missing), "--port", str(free_port())]) == 2
    line = _one_error_line(capsys)
    assert f"checkpoint '{missing}' not found" in line
    assert "shipped name such as 'default'" in line and "name:version" in line
    assert no_bentoml == []


def test_serve_names_the_environment_when_the_checkpoint_came_from_it(capsys, no_bentoml,
                                                                      monkeypatch):
    monkeypatch.setenv("DEQGUARD_CHECKPOINT", "nowhere.safetensors")
    assert main(["serve"]) == 2
    line = capsys.readouterr().err.strip()
    assert "checkpoint 'nowhere.safetensors' (from $DEQGUARD_CHECKPOINT) not found" in line
    assert no_bentoml == []


def test_serve_refuses_a_tag_missing_from_the_model_store(tmp_path, capsys, no_bentoml,
                                                          monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))  # an empty model store
    assert main(["serve", "no-such-model:v1"]) == 2
    line = _one_error_line(capsys)
    assert "checkpoint 'no-such-model:v1' is not a file and not a model in the BentoML model " \
           "store" in line
    assert str(tmp_path / "home") in line
    assert no_bentoml == []


def test_serve_refuses_a_file_that_is_no_checkpoint(tmp_path, capsys, no_bentoml):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("hello")
    assert main(["serve", str(bogus)]) == 2
    line = _one_error_line(capsys)
    assert f"checkpoint '{bogus}' cannot be served:" in line and "not a safetensors" in line
    assert no_bentoml == []


def test_serve_refuses_a_busy_port(capsys, no_bentoml):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "default", "--port", str(port)]) == 2
    line = _one_error_line(capsys)
    assert line.endswith(f"port {port} on 127.0.0.1 is in use; pick another with --port")
    assert no_bentoml == []


def test_serve_refuses_a_host_name_bentoml_cannot_bind(capsys, no_bentoml):
    assert main(["serve", "default", "--host", "localhost"]) == 2
    assert "host 'localhost' is not an IP address" in _one_error_line(capsys)
    assert no_bentoml == []


def test_serve_hands_a_good_checkpoint_and_free_port_to_bentoml(tiny_checkpoint, no_bentoml):
    from deqguard.serving.launch import free_port

    port = free_port()
    with pytest.raises(_Started):
        main(["serve", str(tiny_checkpoint), "--port", str(port), "--threads", "2"])
    [(argv, env)] = no_bentoml
    assert argv[argv.index("--port") + 1] == str(port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert env["DEQGUARD_CHECKPOINT"] == str(tiny_checkpoint) and env["DEQGUARD_THREADS"] == "2"


def test_serve_error_is_one_line_in_a_real_process(tmp_path):
    """The console entry point: exit 2, one line on stderr, no traceback, no server."""
    missing = tmp_path / "foo.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("DEQGUARD_CHECKPOINT", None)
    done = subprocess.run([sys.executable, "-m", "deqguard.cli", "serve", str(missing)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"deqguard serve: error: checkpoint '{missing}' not found (give a path, a shipped name "
        "such as 'default', or a model-store tag name:version)"]


def test_serve_help_documents_the_checkpoint_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in ("CHECKPOINT", ".safetensors", "shipped name", "name:version",
                 "$DEQGUARD_CHECKPOINT", "default: 127.0.0.1", "default: 3000",
                 "default: $DEQGUARD_THREADS, else 1", "default: $DEQGUARD_BACKEND, else torch"):
        assert part in text, part


def test_serve_refuses_a_bad_server_setting_naming_its_variable(capsys, no_bentoml,
                                                                monkeypatch):
    from deqguard.serving.launch import free_port

    monkeypatch.setenv("DEQGUARD_REQUEST_BUDGET_MS", "0")
    assert main(["serve", "--port", str(free_port())]) == 2
    line = _one_error_line(capsys)
    assert "request_budget_ms ($DEQGUARD_REQUEST_BUDGET_MS)" in line and "'0'" in line
    assert no_bentoml == []
