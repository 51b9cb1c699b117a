"""Resumable output: rows land in atomic part files next to OUT, then one final file is assembled.

A run can be killed at any instant (SIGKILL included) without losing or doubling rows: each part
(`OUT.parts/part-NNNNNN.jsonl`) is written to a temporary name, fsynced and renamed, so it either
exists whole or not at all. A rerun with the same arguments reads the parts, skips their files,
and at the end writes OUT (atomically, in file order, each file once) and removes the parts.
`OUT.parts/run.json` records what the rows depend on (model, options, input), so a rerun with
different settings is refused instead of mixing rows from two runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .rows import Row, output_format, read_rows, write_rows


class ScoreError(Exception):
    """A scoring run cannot start or go on; the message says what to do."""


class ResumableOutput:
    """Buffers rows and flushes them as part files; `finish` assembles the final output."""

    def __init__(self, out: str | Path, fingerprint: dict[str, Any], *, chunk_rows: int = 512,
                 flush_seconds: float = 30.0, overwrite: bool = False):
        self.out = Path(out)
        self.fmt = output_format(self.out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.fingerprint = fingerprint
        self.chunk_rows = max(1, chunk_rows)
        self.flush_seconds = flush_seconds
        self.overwrite = overwrite
        self._buffer: list[Row] = []
        self._last_flush = time.monotonic()
        self._next_part = 0

    # -- start -------------------------------------------------------------------------------
    def open(self) -> list[Row]:
        """Prepare the parts folder; returns the rows already written (to skip their files)."""
        if self.overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        if self.parts.is_dir():
            meta = self.parts / "run.json"
            previous = json.loads(meta.read_text()) if meta.exists() else None
            if previous != self.fingerprint:
                raise ScoreError(
                    f"{self.parts} holds rows of an unfinished run with other settings "
                    f"({_diff(previous, self.fingerprint)}); rerun with those settings to "
                    "finish it, or pass --overwrite to start again")
            for tmp in self.parts.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            return self._read_parts()
        if self.out.exists():
            rows = read_rows(self.out, self.fmt)
            shas = {r["model_sha256"] for r in rows}
            if shas - {self.fingerprint.get("model_sha256")}:
                raise ScoreError(f"{self.out} exists with rows of another model; pass "
                                 "--overwrite to replace it, or choose another --out")
        else:
            rows = []
        self.parts.mkdir(parents=True, exist_ok=True)
        (self.parts / "run.json").write_text(json.dumps(self.fingerprint, indent=1))
        if rows:  # a finished output being extended with new files: keep its rows
            self._write_part(rows)
        return rows

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.jsonl"))

    def _read_parts(self) -> list[Row]:
        rows: list[Row] = []
        files = self._part_files()
        for f in files:
            rows.extend(read_rows(f, "jsonl"))
        if files:
            self._next_part = int(files[-1].stem.split("-")[1]) + 1
        return rows

    # -- during the run ---------------------------------------------------------------------------
    def add(self, rows: list[Row]) -> None:
        self._buffer.extend(rows)
        if (len(self._buffer) >= self.chunk_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._write_part(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    def _write_part(self, rows: list[Row]) -> None:
        write_rows(self.parts / f"part-{self._next_part:06d}.jsonl", rows, "jsonl")
        self._next_part += 1

    # -- end --------------------------------------------------------------------------------------
    def finish(self, order: list[str]) -> list[Row]:
        """Write OUT with every file once, in `order` (unknown paths last), and drop the parts."""
        self.flush()
        rank = {p: i for i, p in enumerate(order)}
        unique: dict[str, Row] = {}
        for row in self._read_parts():
            unique.setdefault(row["path"], row)
        rows = sorted(unique.values(), key=lambda r: (rank.get(r["path"], len(rank)), r["path"]))
        write_rows(self.out, rows, self.fmt)
        shutil.rmtree(self.parts, ignore_errors=True)
        return rows


def _diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if not old:
        return "no run.json"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)
