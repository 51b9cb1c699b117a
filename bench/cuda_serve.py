"""The serving benchmark on whatever device there is: the served answer, the fixed-iteration
block eager, and that block captured in a CUDA graph. Not a test.

A lone request on a GPU is bound by kernel launches, not arithmetic: a 30-step naive solve is a
few hundred small kernels, each costing launch time the GPU mostly idles through. A CUDA graph
replays them with one launch, so the fixed-iteration block (the computation of the ONNX export:
T naive steps z <- (1 - d) z + d f(z, inject(x)) and the head, no early stop) is the part that
can be captured; the served answer (early stop, settled exit, detector, answers) cannot.

Rows, on `--device` (auto: cuda when torch sees one, else cpu):
- `engine`: `TorchEngine.classify` at the checkpoint's default options (what a plain request
  runs, a lone image solved as a pair as served), numpy in and answers out;
- `fixed eager`: the fixed-iteration block, eager, input already on the device;
- `fixed graph`: the same block replayed from a CUDA graph (static input and output buffers,
  warmed up on a side stream, one graph per batch size); "n/a (no CUDA)" on the CPU.
Batch-1 latency is p50/p99 over `--runs` calls, each bracketed by torch.cuda.synchronize on
CUDA; images/s is per batch size in `--batches` (1,024 and 32 by default), `--repeats` calls.

The served solve's mean iterations and converged fraction on the benchmark's images are reported
with torch's default precision (TF32 convolutions on a GPU, as timed) and in full fp32.

Before timing, the block's logits are checked (max abs difference, printed with the tolerance):
against the exporter's own unrolled module (`serving/onnx_export.py`, what the ONNX graph
computes), against `model.solve` with the naive solver at the same iterations and a tolerance no
sample meets (the reference path), and, on CUDA, the graph's replay against the eager block. The
exit status is 1 when a check fails (the JSON is still written).

    python bench/cuda_serve.py --checkpoint default --json serve.json
    python bench/cuda_serve.py --device cpu --runs 20 --batches 32      # what a CPU gives
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from deqguard.models.device import full_fp32  # noqa: E402

NO_CUDA = "n/a (no CUDA)"


class FixedBlock(nn.Module):
    """T naive steps and the head: the ONNX graph's logits without its per-step diagnostics."""

    def __init__(self, plain: Any, steps: int, damping: float):
        super().__init__()
        self.inner = plain
        self.steps = steps
        self.damping = damping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        if not m.is_deq:
            return m(x)
        u = m.inject(x)
        z = m.initial_state(u)
        d = self.damping
        for _ in range(self.steps):
            fz = m.layer(z, u)
            z = fz if d == 1.0 else (1 - d) * z + d * fz
        return m.decode(z)


def fixed_block(checkpoint: str, iterations: int, device: str) -> tuple[FixedBlock, Any]:
    """The block on `device` and the exporter's unrolled module it must agree with.

    Both share the exporter's copy of the model, weight norm folded into plain weights, so the
    block costs what the exported graph costs and not a weight-norm recompute per call. The
    model is loaded for it alone: folding a deep copy's weight norm removes the parametrized
    property from the class the copy shares with the original, which breaks the original.
    """
    from deqguard.models import load_checkpoint
    from deqguard.serving.onnx_export import _unrolled_module

    model, _ = load_checkpoint(checkpoint, device="cpu")
    unrolled = _unrolled_module(model, iterations).to(device)
    return FixedBlock(unrolled.inner, iterations, unrolled.damping).eval(), unrolled


class GraphedBlock:
    """One CUDA graph of `block` per batch size: copy into the static input, replay, read the
    static output (the recipe of torch.cuda.graph's documentation)."""

    def __init__(self, block: FixedBlock, shape: tuple[int, ...], device: str, warmup: int = 3):
        self.static_x = torch.zeros(shape, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                block(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = block(self.static_x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latencies(fn: Callable[[], object], runs: int, device: str, warmup: int = 3) -> list[float]:
    """Seconds per call, the device synchronised before and after each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def _lat_row(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "runs": len(times)}


def images_per_second(fn: Callable[[], object], batch: int, repeats: int, device: str) -> float:
    fn()  # warm-up: allocator, cuDNN algorithm choice
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return round(batch * repeats / (time.perf_counter() - t), 1)


def _images(n: int, spec: Any, data_dir: str | None, seed: int = 0) -> np.ndarray:
    """Fashion-MNIST test images when --data-dir is given (the engine's early stops depend on
    the input), else uniform noise of the checkpoint's input shape."""
    if data_dir:
        from deqguard.training.data import load_dataset

        ds = load_dataset("fashion-mnist", "test", data_dir=data_dir, limit=n)
        x = np.stack([np.asarray(ds[i][0], np.float32) for i in range(len(ds))])
        if len(x) < n:
            x = np.concatenate([x] * (n // len(x) + 1))[:n]
        return x
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, spec.channels, spec.height, spec.width)).astype(np.float32)


def checks(model: Any, block: FixedBlock, unrolled: Any, x: np.ndarray, device: str,
           iterations: int) -> dict[str, float]:
    """Max abs logit differences of the eager block against the ONNX export's module and the
    naive solve at the same iterations (tol no sample meets, so none stops early)."""
    xt = torch.from_numpy(x).to(device)
    with torch.no_grad(), full_fp32():
        eager = block(xt)
        onnx_path = unrolled(xt)[0]
        solved = model.solve(xt, solver="naive", max_iter=iterations, tol=1e-12,
                             trajectory=False, reference=True).logits
    return {"eager_vs_onnx_module": float((eager - onnx_path).abs().max()),
            "eager_vs_naive_solve": float((eager - solved).abs().max())}


def convergence(model: Any, opts: Any, x: np.ndarray, device: str) -> dict[str, Any]:
    """Mean iterations and converged fraction of the served solve (the engine's solver, budget
    and tolerance) on `x`, with torch's default precision (TF32 convolutions on a GPU) and in
    full fp32: whether a 1e-3 tolerance is reachable at TF32's rounding, which the timings use."""
    xt = torch.from_numpy(x).to(device)

    def solve() -> dict[str, float]:
        res = model.solve(xt, solver=opts.solver, max_iter=opts.max_iter, tol=opts.tol,
                          trajectory=False)
        return {"mean_iterations": float(res.iterations.float().mean()),
                "converged_fraction": float(res.converged.float().mean()), "images": len(x)}

    with torch.no_grad():
        default = solve()
        with full_fp32():
            fp32 = solve()
    return {"default_precision": default, "fp32": fp32}


def _throughput(engine: Any, opts: Any, block: FixedBlock, x: np.ndarray, repeats: int,
                device: str, graphs: dict[int, GraphedBlock], diffs: dict[str, float]
                ) -> dict[str, Any]:
    """images/s of each row at the batch size of `x` (a CUDA graph is captured per size)."""
    b = len(x)
    xb = torch.from_numpy(x).to(device)
    row: dict[str, Any] = {
        "engine": images_per_second(lambda: engine.classify(x, opts, trajectory=False), b,
                                    repeats, device),
        "fixed_eager": images_per_second(lambda: block(xb), b, repeats, device)}
    if device.startswith("cuda"):
        g = graphs.get(b) or GraphedBlock(block, tuple(xb.shape), device)
        row["fixed_graph"] = images_per_second(lambda: g(xb), b, repeats, device)
        diffs[f"graph_vs_eager_batch{b}"] = float((g(xb) - block(xb)).abs().max())
    else:
        row["fixed_graph"] = NO_CUDA
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from deqguard.models.device import resolve_device
    from deqguard.serving.torch_engine import TorchEngine

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    engine = TorchEngine.load(args.checkpoint, device=device, threads=args.threads)
    model, spec = engine.model, engine.spec
    block, unrolled = fixed_block(args.checkpoint, args.iterations, device)
    biggest = max([1, *args.batches])
    pool = _images(biggest, spec, args.data_dir)
    atol = args.atol if args.atol is not None else (1e-4 if cuda else 1e-5)

    diffs = checks(model, block, unrolled, pool[:min(8, biggest)], device, args.iterations)
    opts = engine.default_options()
    converged = convergence(model, opts, pool, device)
    x1 = torch.from_numpy(pool[:1]).to(device)
    rows: dict[str, Any] = {"latency_batch1": {}, "images_per_second": {}}
    lat = rows["latency_batch1"]
    with torch.no_grad():
        lat["engine"] = _lat_row(latencies(lambda: engine.classify(pool[:1], opts), args.runs,
                                           device))
        lat["fixed_eager"] = _lat_row(latencies(lambda: block(x1), args.runs, device))
        graphs = {}
        if cuda:
            graphs[1] = GraphedBlock(block, tuple(x1.shape), device)
            diffs["graph_vs_eager"] = float((graphs[1](x1) - block(x1)).abs().max())
            lat["fixed_graph"] = _lat_row(latencies(lambda: graphs[1](x1), args.runs, device))
        else:
            lat["fixed_graph"] = NO_CUDA
        for b in args.batches:
            rows["images_per_second"][str(b)] = _throughput(engine, opts, block, pool[:b],
                                                            args.repeats, device, graphs, diffs)
    return {"device": device, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, "checkpoint": args.checkpoint,
            "iterations": args.iterations, "engine_options": {
                "solver": opts.solver, "max_iter": opts.max_iter, "tol": opts.tol,
                "settle_iters": opts.settle_iters},
            "checks": {"atol": atol, "max_abs_diff": diffs,
                       "ok": all(v <= atol for v in diffs.values())},
            "engine_convergence": converged, **rows}


def table(r: dict[str, Any]) -> str:
    def lat(v: Any) -> str:
        return v if isinstance(v, str) else f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f}"

    def ips(v: Any) -> str:
        return v if isinstance(v, str) else f"{v:,.0f}"

    lines = [f"device {r['device']} ({r['device_name']}), torch {r['torch']}, checkpoint "
             f"{r['checkpoint']}, fixed block {r['iterations']} naive iterations; engine at "
             f"{r['engine_options']}", ""]
    batches = list(r["images_per_second"])
    head = "| row | batch-1 p50 / p99 ms | " + " | ".join(f"img/s @ {b}" for b in batches) + " |"
    lines += [head, "|---|---:|" + "---:|" * len(batches)]
    for name, label in (("engine", "engine (served answer)"), ("fixed_eager", "fixed eager"),
                        ("fixed_graph", "fixed graph")):
        cells = [ips(r["images_per_second"][b][name]) for b in batches]
        lines.append(f"| {label} | {lat(r['latency_batch1'][name])} | " + " | ".join(cells)
                     + " |")
    c = r["checks"]
    lines.append("")
    lines.append("served solve on the benchmark's images: " + "; ".join(
        f"{k.replace('_', ' ')} {v['mean_iterations']:.1f} iterations, "
        f"{100 * v['converged_fraction']:.1f}% converged"
        for k, v in r["engine_convergence"].items()))
    lines.append("max abs logit diff (atol " + f"{c['atol']:g}): "
                 + ", ".join(f"{k} {v:.2e}" for k, v in c["max_abs_diff"].items())
                 + ("" if r["device"].startswith("cuda") else f", graph {NO_CUDA}")
                 + (" -> ok" if c["ok"] else " -> FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default", help="checkpoint name or path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--iterations", type=int, default=30,
                   help="naive steps of the fixed block (as `deqguard export-onnx`)")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 32],
                   help="batch sizes for images/s")
    p.add_argument("--runs", type=int, default=200, help="batch-1 calls per latency row")
    p.add_argument("--repeats", type=int, default=10, help="calls per images/s cell")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: noise images)")
    p.add_argument("--atol", type=float,
                   help="tolerance of the logit checks, run in full FP32 (default 1e-5 on CPU, "
                        "1e-4 on CUDA, whose kernels may differ between paths)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.runs < 1 or args.repeats < 1 or min(args.batches) < 1:
        p.error("--iterations, --runs, --repeats and --batches must be at least 1")
    from deqguard.errors import DeqguardError

    try:
        result = run(args)
    except DeqguardError as exc:
        print(f"cuda_serve: error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if result["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
