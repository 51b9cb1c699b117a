"""Scoring through the HTTP service: the same rows as local scoring, computed by the server.

Requests go one image each with a bounded number in flight, so the server's adaptive batching
groups them and one bad file costs one error row, not a batch. A sliding window keeps the server
busy across chunk boundaries. A 4xx for a file (not an image, truncated) is that file's error row;
anything else (server gone after retries, 5xx) stops the run, which can then be resumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .client import Client, ServerError, request_options
from .engine import EngineInfo
from .files import Item
from .rows import Row, error_row, result_row


class HttpEngine:
    def __init__(self, url: str, options: dict[str, Any], *, concurrency: int = 16,
                 timeout: float = 120.0, retries: int = 5):
        self.options = request_options(options)
        self.concurrency = max(1, concurrency)
        self.client = Client(url, timeout=timeout, retries=retries)
        self._info: EngineInfo | None = None

    def info(self) -> EngineInfo:
        if self._info is None:
            meta = self.client.model_info()
            self._info = EngineInfo(classes=list(meta["classes"]), sha256=meta["sha256"],
                                    name=meta.get("name", ""), input=meta.get("input", {}))
        return self._info

    def _row(self, item: Item) -> Row:
        sha = self.info().sha256
        try:
            return result_row(item, self.client.classify(item.file, **self.options))
        except ServerError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                return error_row(item, exc.message, sha)
            raise
        except OSError as exc:
            return error_row(item, f"unreadable file: {exc.strerror or exc}", sha)

    def run(self, items: list[Item], chunk: int = 64) -> Iterator[list[Row]]:
        window = self.concurrency * 4
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            pending: deque[Future[Row]] = deque()
            todo = iter(items)
            out: list[Row] = []
            try:
                for item in todo:
                    pending.append(pool.submit(self._row, item))
                    if len(pending) >= window:
                        out.append(pending.popleft().result())
                    if len(out) >= chunk:
                        yield out
                        out = []
                while pending:
                    out.append(pending.popleft().result())
                    if len(out) >= chunk:
                        yield out
                        out = []
                if out:
                    yield out
            finally:
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        self.client.close()
