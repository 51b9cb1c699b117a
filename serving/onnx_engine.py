"""The ONNX backend: the exported fixed-iteration graph under onnxruntime.

It answers exactly like the torch naive solver: the graph always runs its T iterations, and the
per-sample stop at `tol` (and any max_iter <= T) is recovered afterwards from the trajectory
outputs (see onnx_export.py). Only the naive solver and no defense: the entropy-reduction defense
needs input gradients at inference, which ONNX inference does not have.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqguard.models import CheckpointMetadata, read_metadata
from deqguard.models.device import resolve_device
from deqguard.models.entropy import prediction_entropy

from .engine import ModelEngine
from .options import DEFAULT_SETTLE_ITERS, OptionsError, SolveOptions
from .traces import SampleTrace

log = logging.getLogger(__name__)


def providers_for(device: str) -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and `device` (resolved: "cpu" or "cuda")
    is a GPU, CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxEngine(ModelEngine):
    backend = "onnx"
    computes_features = False  # the graph has no autograd: no learned-detector features

    def __init__(self, onnx_path: str | Path, *, device: str = "auto", threads: int = 1,
                 max_iter_cap: int = 100):
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(onnx_path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        if "deqguard.metadata" not in props:
            raise ValueError(f"{onnx_path} was not written by `deqguard export-onnx` "
                             "(no deqguard metadata in the graph)")
        meta = CheckpointMetadata.model_validate(json.loads(props["deqguard.metadata"]))
        self.iterations = int(props["deqguard.iterations"])
        # The one cap: the server's, or the graph's fixed iteration count where that is lower.
        super().__init__(meta, max_iter_cap=min(max_iter_cap, self.iterations))
        solver_cfg = meta.model.get("solver") or {}
        self._is_deq = "solver" in meta.model
        self.default_tol = float(solver_cfg.get("tol", 1e-3))
        self.default_max_iter = int(solver_cfg.get("max_iter", self.iterations))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts,
                                            providers=providers_for(resolve_device(device)))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.path = str(onnx_path)
        log.info("ONNX engine on %s, %d iterations", self.session.get_providers(),
                 self.iterations)

    @classmethod
    def from_settings(cls, settings: Any) -> OnnxEngine:
        """Use DEQGUARD_ONNX, or export the checkpoint into a temporary directory now."""
        path = settings.onnx_path
        if not path:
            from .onnx_export import export_onnx

            meta = read_metadata(settings.checkpoint)
            iters = settings.onnx_iterations or int(
                (meta.model.get("solver") or {}).get("max_iter", 30))
            # the graph runs all its iterations on every call: none past what the cap allows
            iters = min(iters, settings.max_iter_cap)
            path = str(Path(tempfile.mkdtemp(prefix="deqguard-onnx-")) / "model.onnx")
            dynamo = {"auto": None, "dynamo": True, "torchscript": False}[settings.onnx_exporter]
            export_onnx(settings.checkpoint, path, iterations=iters, dynamo=dynamo)
        return cls(path, device=settings.device, threads=settings.threads,
                   max_iter_cap=settings.max_iter_cap)

    @property
    def is_deq(self) -> bool:
        return self._is_deq

    def checkpoint_options(self, defense: str = "none") -> SolveOptions:
        return SolveOptions(max_iter=self.default_max_iter, tol=self.default_tol,
                            solver="naive", defense=defense,
                            settle_iters=DEFAULT_SETTLE_ITERS if defense == "none" else 0)

    @property
    def cap_text(self) -> str:
        if self.max_iter_cap < self.iterations:
            return super().cap_text
        return f"{self.iterations} (the exported graph's iterations)"

    def check_options(self, opts: SolveOptions) -> None:
        if opts.defense != "none":
            raise OptionsError(f"the {opts.defense} defense needs input gradients and runs only "
                               "on the torch backend; this server runs the ONNX backend")
        if opts.solver != "naive":
            raise OptionsError(f"the ONNX backend runs the naive solver only (a fixed-iteration "
                               f"graph), not {opts.solver!r}")
        super().check_options(opts)

    def check_deadline(self, opts: SolveOptions) -> None:
        raise OptionsError("deadline_ms needs the torch backend: the ONNX graph runs all its "
                           "iterations in one call and cannot stop at a deadline")

    def defenses(self) -> list[str]:
        return ["none"]

    def solvers(self) -> list[str]:
        return ["naive"]

    def run_graph(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The raw graph outputs by name (parity tests and the benchmark use this)."""
        outs = self.session.run(None, {self.session.get_inputs()[0].name: x})
        return dict(zip(self.output_names, outs, strict=True))

    def _solve(self, x: np.ndarray, opts: SolveOptions,
               deadlines: np.ndarray | None) -> list[SampleTrace]:
        g = {name: torch.from_numpy(out) for name, out in self.run_graph(x).items()}
        ent, res, traj = g["entropy"], g["residual"], g["logits_trajectory"]
        stop = g.get("logits_stop", traj)
        out = []
        for i in range(x.shape[0]):
            hits = torch.nonzero(res[: opts.max_iter, i].double() < opts.tol).flatten()
            # the torch solvers: stopping at step t ends on f(z_{t-1}), i.e. logits_stop[t-1]
            it = int(hits[0]) + 1 if hits.numel() else opts.max_iter
            stopped = bool(hits.numel())
            settled = (None if self.reads_dynamics(opts)  # as the torch engine
                       else self._settled_at(traj[:it, i], ent[:it, i], opts))
            if settled is not None and (settled < it or not stopped):
                it, stopped = settled, False
                why = "settled"
            else:
                why = "tol" if stopped else "max_iter"
            e = ent[:it, i].clone()
            logits = (stop if stopped else traj)[it - 1, i].clone()
            if stopped and "logits_stop" in g:
                e[-1] = prediction_entropy(logits)
            out.append(SampleTrace(logits=logits, entropy=e, residual=res[:it, i].clone(),
                                   iterations=it, converged=stopped, stopped=why))
        return out

    @staticmethod
    def _settled_at(logits: torch.Tensor, ent: torch.Tensor, opts: SolveOptions) -> int | None:
        """The step at which models.anytime.SettleRule stops this sample (the torch solver's
        check after each step, replayed on the graph's iterates), or None."""
        if not opts.settle_iters:
            return None
        top1 = logits.argmax(-1).tolist()
        calm = (ent < opts.settle_entropy).tolist()
        run = 0
        for t in range(len(top1)):
            run = run + 1 if t > 0 and top1[t] == top1[t - 1] else 1
            if run >= opts.settle_iters and calm[t]:
                return t + 1
        return None
