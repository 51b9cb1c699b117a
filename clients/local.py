"""Local scoring: the checkpoint runs in this process, fed by parallel decoding workers.

Imports torch, so only the `local` and `ray` engines load this module. Each file goes through
`deqguard.serving.images.decode_image` (the server's preprocessing) in DataLoader worker
processes, so the model is not starved by PNG decoding; batches are solved on CUDA when present.
Answers come from the service's engine through `ModelScorer`, shared with the Ray actors. On a
GPU, rows are built in separate processes while the model solves the next batch: the per-image
Python work of an answer (probabilities, trajectory, detection) outweighs a small model's solve.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deqguard.models.device import resolve_device
from deqguard.serving.answers import AnswerBuilder
from deqguard.serving.images import ImageError, decode_image
from deqguard.serving.options import SolveOptions
from deqguard.serving.schema import ClassifyOptions
from deqguard.serving.torch_engine import TorchEngine
from deqguard.serving.traces import SampleTrace
from deqguard.serving.validation import options_of
from deqguard.solve_rules import MAX_ITER_BOUND

from .engine import EngineInfo
from .files import Item
from .rows import Row, error_row, result_row


def resolve_path(checkpoint: str) -> str:
    from deqguard.models.checkpoint import resolve_checkpoint

    return os.path.abspath(resolve_checkpoint(checkpoint))


def default_workers() -> int:
    """Decoding processes: leave one core to the model, keep at least one worker, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class Decoded:
    """A decoded file (`array` [C,H,W] float32) or the reason it could not be decoded."""

    index: int
    array: np.ndarray | None
    error: str | None


def decode_file(path: str, spec: Any, index: int = 0) -> Decoded:
    """Read and decode one file as the server would; any failure becomes an error string."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        arr = decode_image(data, channels=spec.channels, height=spec.height, width=spec.width)
        return Decoded(index, arr, None)
    except ImageError as exc:
        return Decoded(index, None, str(exc))
    except OSError as exc:
        return Decoded(index, None, f"unreadable file: {exc.strerror or exc}")


class _Files(Dataset):
    def __init__(self, files: list[str], spec: Any):
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        return decode_file(self.files[i], self.spec, i)


def _keep_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for cores


Entry = SampleTrace | str  # a solved file's trace, or why the file could not be decoded


class RowBuilder:
    """Traces (or decode errors) -> rows, exactly as the server would answer each file."""

    def __init__(self, meta: Any, opts: SolveOptions):
        self.answers = AnswerBuilder(meta)
        self.opts, self.sha = opts, meta.sha256

    def rows(self, items: list[Item], entries: list[Entry]) -> list[Row]:
        solved = [e for e in entries if not isinstance(e, str)]
        answers = iter(self.answers.answers(solved, [self.opts] * len(solved),
                                            [True] * len(solved)))
        return [error_row(it, e, self.sha) if isinstance(e, str) else result_row(it, next(answers))
                for it, e in zip(items, entries, strict=True)]


class ModelScorer:
    """A checkpoint plus request options: decoded arrays in, rows out, as the server answers.

    The answers come from the service's own engine (`deqguard.serving.torch_engine`), so the
    solve call, option defaults, trajectory cut and detection are the server's, not a copy.
    """

    def __init__(self, checkpoint: str, options: dict[str, Any], device: str | None = None):
        from deqguard.models import load_checkpoint

        dev = resolve_device(device)
        self.device = torch.device(dev)
        model, self.meta = load_checkpoint(checkpoint, device=dev)
        # No server cap offline: the checkpoint config's own bound (SolverConfig) still applies.
        self.engine = TorchEngine(model, self.meta, device=dev, max_iter_cap=MAX_ITER_BOUND)
        opts = ClassifyOptions.model_validate(options)
        self.solve_options = self.engine.resolve(**options_of(opts))
        self.builder = RowBuilder(self.meta, self.solve_options)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(classes=list(self.meta.classes), sha256=self.meta.sha256,
                          name=self.meta.name, input=self.meta.input.model_dump())

    def traces(self, decoded: list[Decoded]) -> list[Entry]:
        """Decoded files solved as one batch; the others keep their decode error."""
        good = [i for i, d in enumerate(decoded) if d.array is not None]
        out: list[Entry] = [d.error or "undecodable" for d in decoded]
        if good:
            x = np.stack([decoded[i].array for i in good])
            for i, t in zip(good, self.engine.trace(x, self.solve_options), strict=True):
                out[i] = t
        return out

    def rows(self, items: list[Item], decoded: list[Decoded]) -> list[Row]:
        return self.builder.rows(items, self.traces(decoded))


# Row-building processes (GPU runs): each holds the answer logic for the checkpoint it was given.
_ROW_PROCESS: dict[str, Any] = {}


def _init_row_process(checkpoint: str) -> None:
    from deqguard.models.checkpoint import read_metadata

    torch.set_num_threads(1)
    _ROW_PROCESS["meta"] = read_metadata(checkpoint)


def _build_rows(items: list[Item], entries: list[Entry], opts: SolveOptions) -> list[Row]:
    builder = _ROW_PROCESS.get("builder")
    if builder is None or builder.opts != opts:
        builder = _ROW_PROCESS["builder"] = RowBuilder(_ROW_PROCESS["meta"], opts)
    return builder.rows(items, entries)


def _started() -> bool:
    return True


class LocalEngine:
    """Scores in this process: DataLoader workers decode, the model solves batch by batch."""

    def __init__(self, checkpoint: str, options: dict[str, Any], *, batch_size: int = 64,
                 workers: int | None = None, device: str | None = None,
                 threads: int | None = None, row_workers: int | None = None):
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        cores = os.cpu_count() or 1
        device = resolve_device(device)
        if row_workers is None:  # on CPU the model dominates: rows are built in-line
            row_workers = 0 if device == "cpu" else min(4, max(1, (cores - self.workers) // 2))
        self.row_workers = row_workers
        # Cores left by the decoding workers, unless OMP_NUM_THREADS says otherwise:
        # oversubscribed intra-op threads on a busy box have run the model 20x slower.
        if threads or "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads or max(1, cores - self.workers))
        self.scorer = ModelScorer(checkpoint, options, device)
        self.pool: ProcessPoolExecutor | None = None
        if row_workers:  # started now, so the processes come up while the loader starts
            self.pool = ProcessPoolExecutor(
                row_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_row_process, initargs=(resolve_path(checkpoint),))
            for _ in range(row_workers):
                self.pool.submit(_started)

    def info(self) -> EngineInfo:
        return self.scorer.info

    def run(self, items: list[Item]) -> Iterator[list[Row]]:
        if not items:
            return
        spec = self.scorer.meta.input
        loader = DataLoader(
            _Files([it.file for it in items], spec), batch_size=self.batch_size, shuffle=False,
            num_workers=self.workers, collate_fn=_keep_list, worker_init_fn=_one_thread,
            prefetch_factor=4 if self.workers else None)
        starts = range(0, len(items), self.batch_size)
        batches = ((items[i:i + len(d)], d) for i, d in zip(starts, loader, strict=True))
        if self.pool is None:
            for chunk, decoded in batches:
                yield self.scorer.rows(chunk, decoded)
            return
        # Rows are built in other processes while the model solves the next batch: on a GPU the
        # per-image Python work (answers, detection) otherwise costs more than the model itself.
        opts = self.scorer.solve_options
        pending: deque[Future[list[Row]]] = deque()
        try:
            for chunk, decoded in batches:
                pending.append(self.pool.submit(_build_rows, chunk, self.scorer.traces(decoded),
                                                opts))
                while pending and (pending[0].done() or len(pending) > 2 * self.row_workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
