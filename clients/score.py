"""`deqguard score`: one row per image file of a folder, through any engine, resumable.

Engines share one small protocol (`info()`, `run(items)` yielding row chunks in order, `close()`):
`local` (this process, torch), `ray` (Ray Data actors, one machine or a cluster) and `http` (the
service, through `Client`); the protocol is in `engine.py`. This module chooses the engine
(`make_engine`) and holds what the runs share: file discovery and labels, the resumable output,
progress and the summary. It imports no torch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deqguard.solve_rules import DEFENSES, FULL_COVERAGE

from .engine import Engine
from .files import build_items, describe_unmatched
from .output import ResumableOutput, ScoreError
from .rows import Row, output_format

# Options given at the value that means "not given": recorded as not given, so `--coverage 1`
# after a run without it (or the other way round) is the same run, not a refused one.
_SAME_AS_ABSENT = {"coverage": FULL_COVERAGE, "defense": DEFENSES[0]}  # DEFENSES[0]: none


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options an output records: sorted, without those given at their absent meaning."""
    return {k: v for k, v in sorted(options.items())
            if not (k in _SAME_AS_ABSENT and v == _SAME_AS_ABSENT[k])}


@dataclass
class Summary:
    rows: int
    errors: int
    suspicious: int
    labelled: int
    correct: int
    scored_now: int
    seconds: float
    out: str
    abstained: int = 0
    answered_labelled: int = 0  # labelled rows without error that did not abstain
    answered_correct: int = 0
    coverage: float | None = None  # the --coverage asked for (None: not given, always answer)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def answered_accuracy(self) -> float | None:
        """Accuracy among the labelled rows that did not abstain (selective answers)."""
        return self.answered_correct / self.answered_labelled if self.answered_labelled else None

    @property
    def answered(self) -> int:
        """Rows the model answered: scored without error and not abstained."""
        return self.rows - self.errors - self.abstained

    def answered_line(self) -> str:
        """How many images got an answer, and why the others did not, in plain words."""
        why = []
        selective = self.coverage is not None and self.coverage < 1
        if self.abstained or selective:
            at = f" at coverage {self.coverage:g}" if self.coverage is not None else ""
            reason = ", where the model was not sure enough" if self.abstained else ""
            why.append(f"abstained: {self.abstained}{reason}{at}")
        if self.errors:
            why.append(f"errors: {self.errors}, files that could not be scored")
        tail = f" ({'; '.join(why)})" if why else ""
        return f"answered: {self.answered} of {self.rows} images{tail}"

    def lines(self) -> list[str]:
        rate = self.scored_now / self.seconds if self.seconds > 0 else 0.0
        out = [f"rows: {self.rows} ({self.scored_now} scored in this run, {rate:.1f} images/s)",
               f"errors: {self.errors}", f"suspicious: {self.suspicious}", self.answered_line()]
        if self.accuracy is not None:
            out.append(f"accuracy: {self.accuracy:.4f} ({self.correct}/{self.labelled} labelled "
                       "images without error)")
        if self.abstained and self.answered_accuracy is not None:
            out.append(f"accuracy among answered: {self.answered_accuracy:.4f} "
                       f"({self.answered_correct}/{self.answered_labelled})")
        out.append(f"output: {self.out}")
        return out


def summarise(rows: list[Row], *, scored_now: int, seconds: float, out: str,
              coverage: float | None = None) -> Summary:
    ok = [r for r in rows if r["error"] is None]
    labelled = [r for r in ok if r["label"] is not None]
    answered = [r for r in labelled if not r.get("abstained")]  # rows of older runs lack it
    return Summary(rows=len(rows), errors=len(rows) - len(ok),
                   suspicious=sum(bool(r["suspicious"]) for r in ok), labelled=len(labelled),
                   correct=sum(r["label"] == r["pred"] for r in labelled),
                   scored_now=scored_now, seconds=seconds, out=out,
                   abstained=sum(bool(r.get("abstained")) for r in ok),
                   answered_labelled=len(answered),
                   answered_correct=sum(r["label"] == r["pred"] for r in answered),
                   coverage=coverage)


@dataclass
class ScoreConfig:
    """Everything `deqguard score` was asked; `options` are ClassifyOptions fields."""

    input_dir: str
    out: str
    checkpoint: str | None = None
    url: str | None = None
    engine: str = "local"
    batch_size: int = 64
    workers: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    chunk_rows: int = 512
    concurrency: int = 16
    overwrite: bool = False
    progress: bool = True
    device: str | None = None
    threads: int | None = None
    row_workers: int | None = None  # processes building rows (default: some on GPU, none on CPU)
    warn: Callable[[str], None] | None = None  # where warnings go (default: stderr)


def warn_on_stderr(message: str) -> None:
    print(f"deqguard score: warning: {message}", file=sys.stderr)


def make_engine(cfg: ScoreConfig) -> Engine:
    if cfg.url:
        from .remote import HttpEngine

        return HttpEngine(cfg.url, cfg.options, concurrency=cfg.concurrency)
    checkpoint = cfg.checkpoint or "default"
    if cfg.engine == "local":
        from .local import LocalEngine

        return LocalEngine(checkpoint, cfg.options, batch_size=cfg.batch_size,
                           workers=cfg.workers, device=cfg.device, threads=cfg.threads,
                           row_workers=cfg.row_workers)
    if cfg.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(checkpoint, cfg.options, batch_size=cfg.batch_size, workers=cfg.workers)
    raise ScoreError(f"unknown engine {cfg.engine!r}: use local or ray")


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the client-only install has no tqdm: no bar, the summary still prints
        enabled = False
        tqdm = None
    if not enabled or tqdm is None:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, smoothing=0.1,
                desc="scoring")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def score_folder(cfg: ScoreConfig) -> Summary:
    """Score every image under `cfg.input_dir` into `cfg.out`, resuming an interrupted run."""
    output_format(cfg.out)  # fail on a bad suffix before loading a model
    if not Path(cfg.input_dir).is_dir():
        raise ScoreError(f"input folder not found: {cfg.input_dir}")
    engine = make_engine(cfg)
    try:
        info = engine.info()
        items, labels = build_items(cfg.input_dir, info.classes)
        unmatched = describe_unmatched(labels, info.classes)
        if unmatched:
            (cfg.warn or warn_on_stderr)(unmatched)
        fingerprint = {
            "input_dir": os.path.abspath(cfg.input_dir), "model_sha256": info.sha256,
            "options": recorded_options(cfg.options),
        }
        output = ResumableOutput(cfg.out, fingerprint, chunk_rows=cfg.chunk_rows,
                                 overwrite=cfg.overwrite)
        done = {r["path"] for r in output.open()}
        todo = [it for it in items if it.path not in done]
        bar = _progress(len(items), len(items) - len(todo), cfg.progress)
        start, scored = time.perf_counter(), 0
        try:
            for rows in engine.run(todo):
                output.add(rows)
                scored += len(rows)
                bar.update(len(rows))
        except BaseException:
            output.flush()  # keep every finished row (Ctrl-C, a server gone away) for the rerun
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        rows = output.finish([it.path for it in items])
    finally:
        engine.close()
    return summarise(rows, scored_now=scored, seconds=seconds, out=cfg.out,
                     coverage=cfg.options.get("coverage"))
