"""Start and stop a REAL `bentoml serve` of the deqguard service for tests (not a test module).

Used by the `served_url` fixture in conftest.py and by tests that need a server with other
settings (the ONNX backend). One thread per process, no tracking, 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVICE = "deqguard.serving.service:DEQGuard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoint: str | os.PathLike, log_path: Path, *, timeout: float = 180.0,
          **env: str) -> Iterator[str]:
    """Yield the base URL once /readyz answers 200; stop the whole process group afterwards.

    `env` adds DEQGUARD_* settings (e.g. DEQGUARD_BACKEND="onnx"). The server's output goes to
    `log_path`, whose tail is shown if the server fails to start.
    """
    port = free_port()
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "DEQGUARD_THREADS": "1",
                "DEQGUARD_CHECKPOINT": str(checkpoint), **env}
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: circus workers stop with it
    try:
        _wait_ready(url, proc, log_path, timeout)
        yield url
    finally:
        _stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n"
                               + log_path.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout} s:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
