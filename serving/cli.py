"""`deqguard export-onnx` and `deqguard serve`: the serving side of the command line.

Torch, BentoML and the service are imported inside the handlers, so `deqguard --help` and
`deqguard serve --help` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from deqguard.threads import add_threads_argument, apply_threads, thread_count

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000

_SERVE_DESCRIPTION = """\
Serve a checkpoint over HTTP with BentoML: POST /classify (also /classify_batch,
/classify_tensor), GET /model, the browser page /ui, /docs, /metrics, /livez and /readyz.

The checkpoint and the port are checked first, so a wrong path, an unknown model-store tag or a
busy port is one line of error (exit 2) instead of a server that fails to start; then this
process becomes `bentoml serve deqguard.serving.service:DEQGuard`. Stop it with Ctrl-C.
Server settings without a flag here (device, request limits, max_iter cap, batch invariance)
come from DEQGUARD_* environment variables; see the README's serving section."""

_SERVE_EPILOG = """\
examples:
  deqguard serve                                   the shipped model on 127.0.0.1:3000
  deqguard serve runs/smoke/best.safetensors --port 3001
  deqguard serve deqguard-fashion:latest           a tag `deqguard models push CKPT` printed
  deqguard serve --host 0.0.0.0 --threads 4        reachable from other machines
  deqguard serve --backend onnx --onnx model.onnx  a graph from `deqguard export-onnx`"""


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    apply_threads(args.threads)
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


def _check(args: argparse.Namespace, checkpoint: str) -> None:
    """Refuse, in one line naming the argument, what would stop the server from starting.

    The cheap checks run before the full checkpoint load (which imports torch)."""
    from .checks import ServeError, check_checkpoint, check_onnx, check_port

    if args.threads < 1:
        raise ServeError(f"--threads {args.threads}: the model worker needs at least 1")
    from .settings import settings_problem

    problem = settings_problem({"checkpoint": checkpoint, "backend": args.backend,
                                "threads": args.threads})
    if problem:
        raise ServeError(problem)
    from_env = args.checkpoint is None and "DEQGUARD_CHECKPOINT" in os.environ
    label = f"checkpoint {checkpoint!r}" + (" (from $DEQGUARD_CHECKPOINT)" if from_env else "")
    graph = args.backend == "onnx" and args.onnx
    if graph:  # the server then runs the graph alone, as its preflight does
        check_onnx(args.onnx, f"--onnx {args.onnx!r}")
    check_port(args.host, args.port)
    if not graph:
        check_checkpoint(checkpoint, label)


def _serve(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint or os.environ.get("DEQGUARD_CHECKPOINT") or "default"
    _check(args, checkpoint)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DEQGUARD_CHECKPOINT": checkpoint,
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
    add_threads_argument(p, default=1)
    p.set_defaults(func=_export_onnx)

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (bentoml serve)",
                       description=_SERVE_DESCRIPTION, epilog=_SERVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # Resolved in the handler (None = not given), so an error can say where the value came from.
    s.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="what to serve: a .safetensors file, a shipped name ('default', the "
                        "shipped model), or a BentoML model-store tag name:version or "
                        "name:latest (`deqguard models push CKPT` stores one, "
                        "`deqguard models list` shows them) "
                        "(default: $DEQGUARD_CHECKPOINT, else default)")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help="IP address to listen on; 0.0.0.0 for every interface "
                        f"(default: {DEFAULT_HOST}, this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port to listen on (default: {DEFAULT_PORT})")
    # The environment is the flags' default, so `DEQGUARD_BACKEND=onnx make serve` (README) serves
    # the backend it names; a flag given on the command line still wins.
    s.add_argument("--backend", choices=["torch", "onnx"],
                   default=os.environ.get("DEQGUARD_BACKEND") or "torch",
                   help="inference backend (default: $DEQGUARD_BACKEND, else torch)")
    s.add_argument("--onnx", default=os.environ.get("DEQGUARD_ONNX") or None,
                   help="exported graph for --backend onnx (default: $DEQGUARD_ONNX, else "
                        "exported from the checkpoint at start-up)")
    # A string default goes through `type`, so a bad $DEQGUARD_THREADS is a usage error, not a
    # traceback while the parser is built for any command.
    s.add_argument("--threads", type=thread_count,
                   default=os.environ.get("DEQGUARD_THREADS") or "1", metavar="N",
                   help="torch / onnxruntime intra-op threads of the model worker "
                        "(default: $DEQGUARD_THREADS, else 1)")
    s.set_defaults(func=_serve)
