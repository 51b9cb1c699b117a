"""Starting a server on a free port (serving/launch.py): a port taken between being chosen and
being bound is retried on another; any other failure is reported with the server's log.

The server here is Python's http.server (a file named `readyz` in its folder answers /readyz
with 200), so these tests need no BentoML start-up.
"""

from __future__ import annotations

import os
import socket
import sys

import httpx
import pytest


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_a_port_taken_before_the_server_binds_it_is_retried_on_another(tmp_path, monkeypatch):
    from deqguard.serving import launch

    (tmp_path / "readyz").write_text("ok")
    with socket.socket() as held:  # what another process did with the "free" port meanwhile
        held.bind(("127.0.0.1", 0))  # bound, not listening: connections to it are refused
        taken = held.getsockname()[1]
        ports = iter([taken, launch.free_port()])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports))
        proc, url = launch.start_on_free_port(_http_server, env=dict(os.environ), cwd=tmp_path,
                                              log_path=tmp_path / "server.log", timeout=60)
        try:
            assert url != f"http://127.0.0.1:{taken}"
            assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        finally:
            launch.stop_process_group(proc)


def test_a_port_taken_at_every_attempt_is_an_error_with_the_log(tmp_path, monkeypatch):
    from deqguard.serving import launch

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(launch, "free_port", lambda: taken)
        with pytest.raises(RuntimeError, match="Address already in use"):
            launch.start_on_free_port(_http_server, env=dict(os.environ), cwd=tmp_path,
                                      log_path=tmp_path / "server.log", timeout=60, attempts=2)


def test_a_server_that_fails_otherwise_is_not_started_again(tmp_path):
    from deqguard.serving import launch

    started: list[int] = []

    def argv(port: int) -> list[str]:
        started.append(port)
        return [sys.executable, "-c", "import sys; print('checkpoint not found'); sys.exit(3)"]

    with pytest.raises(RuntimeError, match="exited with 3:\n.*checkpoint not found"):
        launch.start_on_free_port(argv, env=dict(os.environ), log_path=tmp_path / "server.log",
                                  timeout=60)
    assert len(started) == 1
