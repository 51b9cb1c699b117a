"""`deqguard export-onnx` and `deqguard serve`: the serving side of the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _export_onnx(args: argparse.Namespace) -> int:
    import torch

    from .onnx_export import export_onnx

    torch.set_num_threads(max(1, args.threads))
    dynamo = {"auto": None, "dynamo": True, "torchscript": False}[args.exporter]
    info = export_onnx(args.checkpoint, args.out, iterations=args.iterations, dynamo=dynamo)
    if args.check:
        info["max_abs_diff_vs_torch"] = _parity(args.checkpoint, args.out, args.iterations)
    print(json.dumps(info, indent=2))
    return 0


def _parity(checkpoint: str, path: str, iterations: int) -> float:
    """Largest |ONNX - torch naive solver| over logits, entropy and residual on random inputs."""
    import numpy as np
    import torch

    from deqguard.models import load_checkpoint

    from .onnx_engine import OnnxEngine

    model, meta = load_checkpoint(checkpoint, device="cpu")
    s = meta.input
    x = np.random.default_rng(0).uniform(0, 1, (4, s.channels, s.height, s.width))
    x = x.astype(np.float32)
    graph = OnnxEngine(path, device="cpu").run_graph(x)
    with torch.no_grad():
        # tol tiny so that no sample stops early: the graph always runs every iteration
        r = model.solve(torch.from_numpy(x), solver="naive", max_iter=iterations, tol=1e-12)
    pairs = [(graph["logits"], r.logits), (graph["residual"], r.residual)]
    if r.entropy is not None:
        pairs.append((graph["entropy"], r.entropy))
    return max(float(np.abs(a - b.numpy()).max()) for a, b in pairs)


def _serve(args: argparse.Namespace) -> int:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DEQGUARD_CHECKPOINT": args.checkpoint,
           "DEQGUARD_BACKEND": args.backend, "DEQGUARD_THREADS": str(args.threads)}
    if args.onnx:
        env["DEQGUARD_ONNX"] = args.onnx
    cmd = [sys.executable, "-m", "bentoml", "serve", "deqguard.serving.service:DEQGuard",
           "--host", args.host, "--port", str(args.port)]
    # Become the server rather than wait on it: a signal to this process (Ctrl-C, a supervisor's
    # TERM) then reaches BentoML's arbiter, which stops its workers, instead of orphaning them.
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="export a checkpoint as a fixed-iteration ONNX graph")
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint, or a shipped name")
    p.add_argument("--iterations", type=int, required=True,
                   help="naive solver iterations unrolled into the graph (the served max_iter cap)")
    p.add_argument("--out", required=True, help="output .onnx file (weights embedded)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="torch exporter; auto tries dynamo, then TorchScript (default: auto)")
    p.add_argument("--check", action="store_true",
                   help="also report the largest difference from the torch naive solver")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_export_onnx)

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (bentoml serve)")
    s.add_argument("checkpoint", nargs="?", default=os.environ.get("DEQGUARD_CHECKPOINT",
                                                                   "default"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    # The environment is the flags' default, so `DEQGUARD_BACKEND=onnx make serve` (README) serves
    # the backend it names; a flag given on the command line still wins.
    s.add_argument("--backend", choices=["torch", "onnx"],
                   default=os.environ.get("DEQGUARD_BACKEND") or "torch",
                   help="inference backend (default: $DEQGUARD_BACKEND, else torch)")
    s.add_argument("--onnx", default=os.environ.get("DEQGUARD_ONNX") or None,
                   help="exported graph for --backend onnx (default: $DEQGUARD_ONNX, else "
                        "exported at start-up)")
    s.add_argument("--threads", type=int, default=int(os.environ.get("DEQGUARD_THREADS", "1")))
    s.set_defaults(func=_serve)
