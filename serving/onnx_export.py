"""Export a checkpoint as a fixed-iteration ONNX graph (naive fixed-point solver, unrolled).

ONNX has no clean way to keep a data-dependent solver loop through torch's exporters, so the
graph unrolls exactly `iterations` naive steps z <- (1 - d) z + d f(z, inject(x)) (d = the
checkpoint's `damping`, 1 by default) and returns, with a dynamic batch axis:

- `logits` [B, K]: the head at the last iterate;
- `entropy` [T, B]: prediction entropy (nats) at each iterate z_1..z_T;
- `residual` [T, B]: relative residual ||f(z_t) - z_t|| / ||f(z_t)|| of z_0..z_{T-1}
  (absolute when the checkpoint's stop_mode is "abs");
- `logits_trajectory` [T, B, K]: the head at every iterate;
- `logits_stop` [T, B, K], only when d != 1: the head at f(z_{t-1}), the state a sample ends on
  when it stops at step t.

The graph never stops early. The ONNX engine recovers the torch naive solver's per-sample stop at
`tol` (and any max_iter <= T) from these outputs, because a stopped sample's answer is the
trajectory at its stop step. Parity with torch at "N iterations" therefore means torch run with a
`tol` so small that no sample stops (tests use 1e-12), or the engine's post-processing at any tol.

Weight-norm parametrizations are folded into plain weights on a copy before export, and the
weights are embedded in the file (no external data).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "entropy", "residual", "logits_trajectory", "logits_stop")
_EPS = 1e-9  # the solvers' residual epsilon (models/solvers/base.py)


def _unrolled_module(model: Any, iterations: int) -> Any:
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from deqguard.models.entropy import prediction_entropy

    class UnrolledNaive(nn.Module):
        """z_T after T naive steps with every intermediate statistic as an output."""

        def __init__(self, inner: Any, steps: int):
            super().__init__()
            self.inner = inner
            self.steps = steps
            cfg = getattr(inner.config, "solver", None)
            self.damping = float(cfg.damping) if cfg is not None else 1.0
            self.relative = (cfg.stop_mode == "rel") if cfg is not None else True

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            m = self.inner
            if not m.is_deq:
                logits = m(x)
                ent = prediction_entropy(logits).unsqueeze(0)
                return logits, ent, torch.zeros_like(ent), logits.unsqueeze(0)
            u = m.inject(x)
            z = m.initial_state(u)
            d = self.damping
            traj, stop, res = [], [], []
            for _ in range(self.steps):
                fz = m.layer(z, u)
                diff = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
                if self.relative:
                    diff = diff / (torch.linalg.vector_norm(fz.flatten(1), dim=1) + _EPS)
                res.append(diff)
                if d != 1.0:
                    stop.append(m.decode(fz))
                    z = (1 - d) * z + d * fz
                else:
                    z = fz
                traj.append(m.decode(z))
            logits_traj = torch.stack(traj)
            ent = prediction_entropy(logits_traj)
            outs = (logits_traj[-1], ent, torch.stack(res), logits_traj)
            return (*outs, torch.stack(stop)) if stop else outs

    plain = copy.deepcopy(model).cpu().eval()
    for mod in plain.modules():
        if parametrize.is_parametrized(mod):
            # A deep copy shares its parametrized class with the original, and removing a
            # parametrization deletes the weight's property from that class: give the copy a
            # class of its own first, so the caller's model keeps its weights.
            cls = type(mod)
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(mod.parametrizations):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    return UnrolledNaive(plain, iterations).eval()


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, iterations: int,
                dynamo: bool | None = None, opset: int = 18) -> dict[str, Any]:
    """Write the fixed-iteration graph of `checkpoint` to `out`; returns what was written.

    `dynamo=None` tries torch's dynamo exporter first and falls back to the TorchScript one.
    The file is checked with `onnx.checker` before it is moved into place.
    """
    import onnx
    import torch

    from deqguard.models import load_checkpoint

    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    model, meta = load_checkpoint(checkpoint, device="cpu")
    module = _unrolled_module(model, iterations)
    spec = meta.input
    example = torch.rand(2, spec.channels, spec.height, spec.width)
    with torch.no_grad():
        n_out = len(module(example))
    names = list(OUTPUT_NAMES[:n_out])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".onnx-export-")) / out.name
    errors = []
    used = None
    for use_dynamo in ([dynamo] if dynamo is not None else [True, False]):
        try:
            _export(module, example, tmp, names, use_dynamo, opset)
            used = "dynamo" if use_dynamo else "torchscript"
            break
        except Exception as exc:  # exporter failures are many and version-specific
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {exc}")
            log.warning("ONNX export with dynamo=%s failed: %s", use_dynamo, exc)
    if used is None:
        raise RuntimeError("ONNX export failed: " + " | ".join(errors))
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    _annotate(proto, meta, iterations, used)
    onnx.save_model(proto, str(out), save_as_external_data=False)
    for f in tmp.parent.iterdir():
        f.unlink()
    tmp.parent.rmdir()
    return {"path": str(out), "iterations": iterations, "exporter": used, "outputs": names,
            "checkpoint": meta.name, "sha256": meta.sha256}


def _export(module: Any, example: Any, path: Path, names: list[str], dynamo: bool,
            opset: int) -> None:
    import torch

    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                          input_names=[INPUT_NAME], output_names=names,
                          dynamic_shapes=({0: batch},), opset_version=opset,
                          verbose=False)
    else:
        axes = {INPUT_NAME: {0: "batch"}}
        for n in names:
            axes[n] = {0: "batch"} if n == "logits" else {1: "batch"}
        with warnings.catch_warnings():  # "legacy exporter" notices: chosen knowingly here
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
                              opset_version=opset)


def _annotate(proto: Any, meta: Any, iterations: int, exporter: str) -> None:
    """Record provenance in the graph's metadata_props (read back by the ONNX engine)."""
    props = {"deqguard.checkpoint": meta.name, "deqguard.sha256": meta.sha256,
             "deqguard.iterations": str(iterations), "deqguard.exporter": exporter,
             "deqguard.metadata": meta.model_dump_json()}
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
