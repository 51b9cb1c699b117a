"""One row per scored file, the same for every engine, and its three on-disk formats.

Every engine turns the service's answer type (`ClassifyResult`) into a row with `result_row`, so
local, HTTP and Ray scoring cannot disagree on what a column means. Parquet keeps the entropy
trajectory as a list column; CSV stores it as a JSON string; JSONL is one JSON object per line.
`read_rows` restores the same Python values from any of the three.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deqguard.fileio import atomic_write_bytes
from deqguard.serving.schema import ClassifyResult

from .files import Item

# Column name -> kind; every column but `path` and `model_sha256` may be null.
COLUMNS: dict[str, str] = {
    "path": "str",
    "label": "int",
    "pred": "int",
    "class_name": "str",
    "confidence": "float",
    "entropy": "list",
    "iterations": "int",
    "converged": "bool",
    "detection_score": "float",
    "suspicious": "bool",
    "abstained": "bool",
    "error": "str",
    "model_sha256": "str",
}
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

Row = dict[str, Any]


def result_row(item: Item, result: ClassifyResult) -> Row:
    """The row of a file the model answered for."""
    return {
        "path": item.path,
        "label": item.label,
        "pred": result.label,
        "class_name": result.class_name,
        "confidence": max(result.probabilities),
        "entropy": list(result.entropy),
        "iterations": result.iterations,
        "converged": result.converged,
        "detection_score": result.detection.score,
        "suspicious": result.detection.suspicious,
        "abstained": result.abstained,
        "error": None,
        "model_sha256": result.model.sha256,
    }


def error_row(item: Item, error: str, sha256: str) -> Row:
    """The row of a file that could not be scored; the run goes on."""
    row: Row = dict.fromkeys(COLUMNS)
    row.update(path=item.path, label=item.label, model_sha256=sha256,
               error=" ".join(str(error).split()) or "unknown error")
    return row


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"unknown output format {suffix!r} for {path}: use .parquet, .csv or .jsonl")
    return FORMATS[suffix]


# -- writing -----------------------------------------------------------------------------------
def arrow_schema():
    import pyarrow as pa

    kinds = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "list": pa.list_(pa.float64())}
    return pa.schema([pa.field(name, kinds[kind]) for name, kind in COLUMNS.items()])


def rows_to_arrow(rows: list[Row]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=arrow_schema())


def _csv_cell(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind == "list":
        return json.dumps(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return repr(float(value))
    return str(value)


def _encode(rows: Iterable[Row], fmt: str, metadata: dict[str, str] | None = None) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([_csv_cell(kind, r.get(name)) for name, kind in COLUMNS.items()])
        return buf.getvalue().encode()
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("writing Parquet needs pyarrow: pip install 'deqguard[parquet]'"
                              ) from None
        table = rows_to_arrow(list(rows))
        if metadata:
            table = table.replace_schema_metadata(metadata)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    raise ValueError(f"unknown format {fmt!r}")


def write_rows(path: str | Path, rows: Iterable[Row], fmt: str | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """Write `rows` to `path` atomically (a reader never sees a half-written file), fsynced.

    `metadata` goes into a Parquet file's key-value metadata; CSV and JSONL have no place for it.
    """
    p = Path(path)
    data = _encode(rows, fmt or output_format(p), metadata)
    atomic_write_bytes(p, data)


# -- reading -----------------------------------------------------------------------------------
def _from_csv(kind: str, text: str) -> Any:
    if text == "":
        return None
    if kind == "list":
        return [float(v) for v in json.loads(text)]
    if kind == "bool":
        return text == "true"
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def read_rows(path: str | Path, fmt: str | None = None) -> list[Row]:
    """The rows of a scoring output in any of the three formats, with their Python types."""
    p = Path(path)
    fmt = fmt or output_format(p)
    if fmt == "jsonl":
        with p.open() as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if fmt == "csv":
        with p.open(newline="") as fh:
            return [{name: _from_csv(kind, rec[name]) for name, kind in COLUMNS.items()}
                    for rec in csv.DictReader(fh)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise ValueError(f"unknown format {fmt!r}")


def read_parquet_metadata(path: str | Path) -> dict[str, str]:
    """A Parquet file's key-value metadata (what `write_rows(metadata=...)` stored), decoded."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}
