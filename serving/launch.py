"""Run `bentoml serve` of the deqguard service as a child process (tests, benchmarks, tools).

The server gets its own process group, so stopping it stops BentoML's worker processes too, and
its own BENTOML_HOME: every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
starts, so servers sharing one home wipe each other's /metrics (and merge their values).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SERVICE = "deqguard.serving.service:DEQGuard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(checkpoint: str | os.PathLike, log_path: str | os.PathLike, *,
                     timeout: float = 180.0, threads: int = 1, cwd: str | None = None,
                     service: str = SERVICE, **env: str) -> Iterator[str]:
    """Yield the base URL (127.0.0.1, a free port) once /readyz answers 200; stop it afterwards.

    `env` adds DEQGUARD_* settings (e.g. DEQGUARD_BACKEND="onnx"); tracking is off and intra-op
    threads are pinned to `threads`. If the server fails to start, the error carries the tail of
    its log (`log_path`). `service` serves another BentoML service the same way (a benchmark's
    baseline, importable from `cwd`), so both are started and stopped alike.
    """
    import httpx

    port = free_port()
    home = tempfile.mkdtemp(prefix="deqguard-bentoml-home-")
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), "DEQGUARD_THREADS": str(threads),
                "DEQGUARD_CHECKPOINT": str(checkpoint), "BENTOML_HOME": home, **env}
    url = f"http://127.0.0.1:{port}"
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            try:
                if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen) -> None:
    """TERM the server's process group, wait, then KILL whatever of the server is left.

    BentoML starts its workers in sessions of their own, so the group signal does not reach
    them; a worker its arbiter failed to stop is re-parented to init and would outlive the server
    (and a test run). Its descendants are therefore listed first and killed last.
    """
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _stop(proc: subprocess.Popen) -> None:
    stop_process_group(proc)
