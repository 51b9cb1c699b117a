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
from collections.abc import Callable, Iterator, Sequence
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
    home = tempfile.mkdtemp(prefix="deqguard-bentoml-home-")
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), "DEQGUARD_THREADS": str(threads),
                "DEQGUARD_CHECKPOINT": str(checkpoint), "BENTOML_HOME": home, **env}
    try:
        proc, url = start_on_free_port(
            lambda port: [sys.executable, "-m", "bentoml", "serve", service,
                          "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, cwd=cwd, log_path=log_path, timeout=timeout)
        try:
            yield url
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# What a server (or `deqguard serve`'s own check) prints when its port is no longer free.
_PORT_TAKEN = ("Address already in use", "Could not bind", "is in use")


def start_on_free_port(argv: Callable[[int], Sequence[str]], *, env: dict[str, str],
                       log_path: str | os.PathLike, cwd: str | os.PathLike | None = None,
                       timeout: float = 180.0,
                       attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start the server `argv(port)` on a free port of 127.0.0.1 in its own process group and
    return it with its base URL once /readyz answers 200.

    A free port is only free when it is chosen: before the server binds it, another server's
    workers or a client's outgoing connection can take it (seen in the test suite, where several
    servers start and stop). A server that exits saying so is started again on another port, up
    to `attempts` times; any other failure raises RuntimeError with the tail of its log.
    """
    import httpx

    log_path = Path(log_path)
    for attempt in range(1, attempts + 1):
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(list(argv(port)), cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-4000:]
                    if attempt < attempts and any(m in tail for m in _PORT_TAKEN):
                        break  # the port was taken before the server bound it: another one
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
                try:
                    if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {timeout} s:\n"
                                       + log_path.read_text(errors="replace")[-4000:])
                time.sleep(0.3)
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
    raise AssertionError("unreachable: the last attempt returns or raises")


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
