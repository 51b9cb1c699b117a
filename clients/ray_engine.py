"""Scoring on Ray Data, for folders that outgrow one machine; the rows are the local engine's.

Pipeline: `from_arrow` blocks over the sorted files -> decoding tasks (`decode_file`, the server's
preprocessing) -> `map_batches` on an `ActorPoolStrategy` of `_RayScorer` actors that each load
the checkpoint once and run the shared `ModelScorer` (one GPU per actor when the cluster has
GPUs) -> rows streamed back in order to the driver, which writes them with the same resumable
output as the local engine. Connects to the cluster in RAY_ADDRESS when set, else starts a local
one. On a real cluster, the input folder and the checkpoint must be readable from every node
(shared storage) and deqguard installed in the workers' environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .engine import EngineInfo
from .files import Item
from .rows import Row

_ARRAY = "array"


def _decode_batch(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray task: decode each file; the array travels as raw float32 bytes (None on failure)."""
    from types import SimpleNamespace

    from .local import decode_file

    s = SimpleNamespace(**spec)
    decoded = [decode_file(str(f), s) for f in batch["file"]]
    out = dict(batch)
    out[_ARRAY] = np.array([d.array.tobytes() if d.array is not None else b""
                            for d in decoded], dtype=object)
    out["decode_error"] = np.array([d.error or "" for d in decoded], dtype=object)
    return out


class _RayScorer:
    """Ray actor: the checkpoint loaded once, batches of decoded files in, Arrow rows out."""

    def __init__(self, checkpoint: str, options: dict[str, Any]):
        import torch

        from .local import ModelScorer

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        self.scorer = ModelScorer(checkpoint, options)
        spec = self.scorer.meta.input
        self.shape = (spec.channels, spec.height, spec.width)

    def __call__(self, batch: dict[str, np.ndarray]):
        from .local import Decoded
        from .rows import rows_to_arrow

        items, decoded = [], []
        for i in range(len(batch["path"])):
            label = batch["label"][i]
            items.append(Item(path=str(batch["path"][i]), file=str(batch["file"][i]),
                              label=None if label < 0 else int(label)))
            raw = batch[_ARRAY][i]
            arr = np.frombuffer(raw, dtype=np.float32).reshape(self.shape) if len(raw) else None
            decoded.append(Decoded(i, arr, str(batch["decode_error"][i]) or None))
        return rows_to_arrow(self.scorer.rows(items, decoded))


class RayEngine:
    def __init__(self, checkpoint: str, options: dict[str, Any], *, batch_size: int = 64,
                 workers: int | None = None, num_cpus: int | None = None):
        import ray

        from deqguard.models.checkpoint import read_metadata, resolve_checkpoint

        self.checkpoint = os.path.abspath(resolve_checkpoint(checkpoint))
        self.meta = read_metadata(self.checkpoint)
        self.options = dict(options)
        self.batch_size = batch_size
        self._started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False,
                         logging_level=logging.WARNING)
            self._started = True
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # GPU: one actor per GPU, decoding runs as separate CPU tasks. CPU only: Ray fuses
        # decoding into the actors, which then use every core but one.
        self.workers = workers or (self.gpus if self.gpus else max(1, cpus - 1))

    def info(self) -> EngineInfo:
        m = self.meta
        return EngineInfo(classes=list(m.classes), sha256=m.sha256, name=m.name,
                          input=m.input.model_dump())

    def run(self, items: list[Item]) -> Iterator[list[Row]]:
        import pyarrow as pa
        import ray

        if not items:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in file order
        ctx.enable_progress_bars = False  # deqguard's own bar counts images
        spec = self.meta.input.model_dump(include={"channels", "height", "width"})
        # One block per batch of the local engine, so each batch meets the model with the same
        # neighbours as there: a solve's last bits depend on its batch, not only on the image.
        b = self.batch_size
        ds = ray.data.from_arrow([pa.table({
            "path": [it.path for it in chunk], "file": [it.file for it in chunk],
            "label": [-1 if it.label is None else it.label for it in chunk]})
            for chunk in (items[i:i + b] for i in range(0, len(items), b))])
        ds = ds.map_batches(_decode_batch, batch_size=self.batch_size, batch_format="numpy",
                            fn_kwargs={"spec": spec}, num_cpus=1)
        ds = ds.map_batches(
            _RayScorer, batch_size=self.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"checkpoint": self.checkpoint, "options": self.options},
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_gpus=1 if self.gpus else 0, num_cpus=1)
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table.to_pylist()

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
