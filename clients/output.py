"""Resumable output: rows land in atomic part files next to OUT, then one final file is assembled.

A run can be killed at any instant (SIGKILL included) without losing or doubling rows: each part
(`OUT.parts/part-NNNNNN.jsonl`) is written to a temporary name, fsynced and renamed, so it either
exists whole or not at all. A rerun with the same arguments reads the parts, skips their files,
and at the end writes OUT (atomically, in file order, each file once) and removes the parts.

Rows depend on the model, the options and the input folder, so every output records them: an
unfinished run in `OUT.parts/run.json`, a finished one in the Parquet file's own metadata (key
`deqguard.score`) or, for CSV and JSONL, in the side file `OUT.run.json`. A rerun with other
settings is refused, finished or not, instead of mixing rows of two runs or reporting old rows as
new; `--overwrite` starts again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from deqguard.fileio import atomic_write_bytes

from .rows import Row, output_format, read_parquet_metadata, read_rows, write_rows

RECORD_KEY = "deqguard.score"  # the record's key in a Parquet output's metadata
AGAIN = "pass --overwrite to score again into it, or choose another --out"


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
    @property
    def side_file(self) -> Path:
        """Where a finished CSV or JSONL output keeps its record (Parquet keeps it inside)."""
        return self.out.with_name(self.out.name + ".run.json")

    def open(self) -> list[Row]:
        """Prepare the parts folder; returns the rows already written (to skip their files)."""
        if self.overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.out.unlink(missing_ok=True)
            self.side_file.unlink(missing_ok=True)
        if self.parts.is_dir():
            meta = self.parts / "run.json"
            previous = json.loads(meta.read_text()) if meta.exists() else None
            if previous != self.fingerprint:
                raise ScoreError(
                    f"{self.parts} holds rows of an unfinished run with other settings "
                    f"({_diff(previous, self.fingerprint)}); rerun with those settings to "
                    "finish it, or pass --overwrite to start again, or choose another --out")
            for tmp in self.parts.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            return self._read_parts()
        if self.out.exists():
            previous = self._finished_record()
            if previous is None:
                where = "" if self.fmt == "parquet" else f" (its {self.side_file.name} is missing)"
                raise ScoreError(f"{self.out} holds no record of the model and options that made "
                                 f"it{where}, so its rows cannot be reused; {AGAIN}")
            if previous != self.fingerprint:
                raise ScoreError(f"{self.out} was scored with other settings "
                                 f"({_diff(previous, self.fingerprint)}); {AGAIN}")
            rows = read_rows(self.out, self.fmt)
        else:
            rows = []
        self.parts.mkdir(parents=True, exist_ok=True)
        (self.parts / "run.json").write_text(json.dumps(self.fingerprint, indent=1))
        if rows:  # a finished output being extended with new files: keep its rows
            self._write_part(rows)
        return rows

    def _finished_record(self) -> dict[str, Any] | None:
        """The settings a finished OUT was made with; None when it has no record."""
        try:
            if self.fmt == "parquet":
                raw = read_parquet_metadata(self.out).get(RECORD_KEY)
            else:
                raw = self.side_file.read_text() if self.side_file.exists() else None
            record = json.loads(raw) if raw else None
            return record if isinstance(record, dict) else None
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ScoreError(f"{self.out} cannot be read as a scoring output ({exc}); "
                             f"{AGAIN}") from None

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
        record = json.dumps(self.fingerprint, indent=1)
        if self.fmt == "parquet":
            write_rows(self.out, rows, self.fmt, metadata={RECORD_KEY: record})
        else:  # the record first: a kill before OUT is written leaves the parts to resume from
            atomic_write_bytes(self.side_file, record.encode())
            write_rows(self.out, rows, self.fmt)
        shutil.rmtree(self.parts, ignore_errors=True)
        return rows


def _settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint as the user knows it: command-line option names, the model's short sha."""
    flat: dict[str, Any] = {}
    if "input_dir" in fingerprint:
        flat["input folder"] = fingerprint["input_dir"]
    if "model_sha256" in fingerprint:
        sha = fingerprint["model_sha256"]
        flat["model sha256"] = sha[:12] if isinstance(sha, str) else sha
    for key, value in (fingerprint.get("options") or {}).items():
        flat["--" + key.replace("_", "-")] = value
    for key, value in fingerprint.items():  # anything else a later version may record
        if key not in ("input_dir", "model_sha256", "options"):
            flat[key] = value
    return flat


def _diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between two runs' settings, e.g. "--coverage was 0.9, now 0.5"."""
    if not old:
        return "it holds no record of the model and options that made it"
    before, now = _settings(old), _settings(new)
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not keys:  # differently written, same meaning: show both whole
        return f"{old} then, {new} now"

    def shown(settings: dict[str, Any], key: str) -> str:
        return str(settings[key]) if key in settings else "not given"

    return "; ".join(f"{k} was {shown(before, k)}, now {shown(now, k)}" for k in keys)
