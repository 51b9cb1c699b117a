"""Start and stop a REAL `bentoml serve` of the deqguard service for tests (not a test module).

Used by the `served_url` fixture in conftest.py and by tests that need a server with other
settings (the ONNX backend): one thread per process, no tracking, 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from deqguard.serving.launch import serve_subprocess

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve(checkpoint: str | os.PathLike, log_path: Path, *, timeout: float = 180.0,
          **env: str) -> Iterator[str]:
    """Yield the base URL once /readyz answers 200; stop the whole process group afterwards.

    `env` adds DEQGUARD_* settings (e.g. DEQGUARD_BACKEND="onnx"). The server's output goes to
    `log_path`, whose tail is shown if the server fails to start.
    """
    with serve_subprocess(checkpoint, log_path, timeout=timeout, threads=1, cwd=str(REPO),
                          **env) as url:
        yield url
