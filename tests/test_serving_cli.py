"""`deqguard serve` serves the backend it is asked for: by flag, or by DEQGUARD_BACKEND (README:
`DEQGUARD_BACKEND=onnx DEQGUARD_ONNX=model.onnx make serve`), visible in GET /model."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx
import psutil

from deqguard.cli import build_parser


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
    from deqguard.serving.launch import free_port, stop_process_group

    port = free_port()
    env = {**os.environ, "DEQGUARD_BACKEND": "onnx", "BENTOML_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deqguard.cli", "serve",
                                 str(tiny_checkpoint), "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        served = httpx.get(url + "/model", timeout=30).json()["serving"]
        assert served["backend"] == "onnx" and served["solvers"] == ["naive"]
        family = psutil.Process(proc.pid).children(recursive=True)
    finally:
        stop_process_group(proc)
    time.sleep(0.5)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes of the server outlived it: {alive}"
