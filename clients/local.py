"""Local scoring: the checkpoint runs in this process, fed by parallel decoding workers.

Imports torch, so only the `local` and `ray` engines load this module. Each file goes through
`deqguard.serving.images.decode_image` (the server's preprocessing) in DataLoader worker
processes, so the model is not starved by PNG decoding; batches are solved on CUDA when present.
Answers are produced by `ModelScorer`, shared with the Ray engine's actors.
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
    """A checkpoint plus request options: decoded arrays in, `ClassifyResult`s out."""

    def __init__(self, checkpoint: str, options: dict[str, Any], device: str | None = None):
        from deqguard.models import load_checkpoint

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_checkpoint(checkpoint, device=self.device)
        self.options = ClassifyOptions.model_validate(options)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(classes=list(self.meta.classes), sha256=self.meta.sha256,
                          name=self.meta.name, input=self.meta.input.model_dump())

    def classify(self, x: torch.Tensor) -> list[ClassifyResult]:
        return classify_tensors(self.model, self.meta, x.to(self.device, non_blocking=True),
                                self.options)

    def rows(self, items: list[Item], decoded: list[Decoded]) -> list[Row]:
        """Rows for `items` in order: decoded files are solved as one batch, others are errors."""
        good = [d for d in decoded if d.array is not None]
        answers: dict[int, ClassifyResult] = {}
        if good:
            x = torch.from_numpy(np.stack([d.array for d in good]))
            answers = dict(zip([d.index for d in good], self.classify(x), strict=True))
        sha = self.meta.sha256
        return [result_row(it, answers[d.index]) if d.array is not None
                else error_row(it, d.error or "undecodable", sha)
                for it, d in zip(items, decoded, strict=True)]


class LocalEngine:
    """Scores in this process: DataLoader workers decode, the model solves batch by batch."""

    def __init__(self, checkpoint: str, options: dict[str, Any], *, batch_size: int = 64,
                 workers: int | None = None, device: str | None = None):
        self.scorer = ModelScorer(checkpoint, options, device)
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers

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


# -- SolveResult -> answer ---------------------------------------------------------------------
def classify_tensors(model: Any, meta: Any, x: torch.Tensor, options: ClassifyOptions
                     ) -> list[ClassifyResult]:
    """The answers the service gives for a batch of preprocessed images."""
    from deqguard.models.detection import detection_score, flag

    if options.defense == "entropy-reduction":
        from deqguard.models.defense import entropy_reduction_solve

        result = entropy_reduction_solve(model, x, solver=options.solver,
                                         max_iter=options.max_iter, tol=options.tol,
                                         trajectory=options.trajectory)
    else:
        with torch.no_grad():
            result = model.solve(x, solver=options.solver, max_iter=options.max_iter,
                                 tol=options.tol, trajectory=options.trajectory)
    cal = meta.detection
    if cal:
        score, suspicious = flag(result, cal)
        score_name, threshold = cal["score"], float(cal["threshold"])
    else:
        score_name, threshold = "final_entropy", None
        score = detection_score(result, score_name)
        suspicious = torch.zeros_like(score, dtype=torch.bool)
    probs = torch.softmax(result.logits.detach().float(), dim=-1).cpu()
    iters = result.iterations.cpu().tolist()
    conv = result.converged.cpu().tolist()
    ent = result.entropy.detach().float().cpu().T if result.entropy is not None else None
    res = result.residual.detach().float().cpu().T
    score_l, susp_l = score.detach().float().cpu().tolist(), suspicious.cpu().tolist()
    out = []
    for i in range(x.shape[0]):
        n = max(1, int(iters[i]))
        label = int(probs[i].argmax())
        out.append(ClassifyResult.model_validate({
            "label": label, "class_name": meta.classes[label],
            "probabilities": probs[i].tolist(),
            "entropy": ent[i, :n].tolist() if ent is not None else [],
            "residual": res[i, :n].tolist() if res.numel() else [],
            "iterations": int(iters[i]), "converged": bool(conv[i]),
            "detection": {"score_name": score_name, "score": score_l[i],
                          "threshold": threshold, "suspicious": bool(susp_l[i])},
            "model": {"name": meta.name, "sha256": meta.sha256},
        }))
    return out
