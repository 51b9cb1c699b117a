"""Local scoring: the checkpoint runs in this process, fed by parallel decoding workers.

Imports torch, so only the `local` and `ray` engines load this module. Each file goes through
`deqguard.serving.images.decode_image` (the server's preprocessing) in DataLoader worker
processes, so the model is not starved by PNG decoding; batches are solved on CUDA when present.
Answers come from the service's engine through `ModelScorer`, shared with the Ray actors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from deqguard.serving.images import ImageError, decode_image
from deqguard.serving.schema import ClassifyOptions, ClassifyResult
from torch.utils.data import DataLoader, Dataset

from .files import Item
from .rows import Row, error_row, result_row
from .score import EngineInfo

MAX_ITER = 1000  # SolverConfig's bound; the server applies its own, lower, cap


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


class ModelScorer:
    """A checkpoint plus request options: decoded arrays in, rows out, as the server answers.

    The answers come from the service's own engine (`deqguard.serving.engine.TorchEngine`), so
    the solve call, option defaults, trajectory cut and detection are the server's, not a copy.
    """

    def __init__(self, checkpoint: str, options: dict[str, Any], device: str | None = None):
        from deqguard.models import load_checkpoint
        from deqguard.serving.engine import TorchEngine

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.meta = load_checkpoint(checkpoint, device=dev)
        # No server cap offline: the checkpoint config's own bound (SolverConfig) still applies.
        self.engine = TorchEngine(model, self.meta, device=dev, max_iter_cap=MAX_ITER)
        opts = ClassifyOptions.model_validate(options)
        self.solve_options = self.engine.resolve(max_iter=opts.max_iter, tol=opts.tol,
                                                 solver=opts.solver, defense=opts.defense)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(classes=list(self.meta.classes), sha256=self.meta.sha256,
                          name=self.meta.name, input=self.meta.input.model_dump())

    def rows(self, items: list[Item], decoded: list[Decoded]) -> list[Row]:
        """Rows for `items` in order: decoded files are solved as one batch, others are errors."""
        good = [d for d in decoded if d.array is not None]
        answers: dict[int, ClassifyResult] = {}
        if good:
            x = np.stack([d.array for d in good])
            results = self.engine.classify(x, self.solve_options, trajectory=True)
            answers = dict(zip([d.index for d in good], results, strict=True))
        sha = self.meta.sha256
        return [result_row(it, answers[d.index]) if d.array is not None
                else error_row(it, d.error or "undecodable", sha)
                for it, d in zip(items, decoded, strict=True)]


class LocalEngine:
    """Scores in this process: DataLoader workers decode, the model solves batch by batch."""

    def __init__(self, checkpoint: str, options: dict[str, Any], *, batch_size: int = 64,
                 workers: int | None = None, device: str | None = None,
                 threads: int | None = None):
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        # Cores left by the decoding workers; oversubscribed intra-op threads on a busy box have
        # been seen to run the model 20x slower.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - self.workers))
        self.scorer = ModelScorer(checkpoint, options, device)

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
        start = 0
        for decoded in loader:
            yield self.scorer.rows(items[start:start + len(decoded)], decoded)
            start += len(decoded)

    def close(self) -> None:
        pass
