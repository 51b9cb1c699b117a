"""Serving throughput: in-process vs over HTTP, and torch vs onnxruntime. Not a test.

    .venv/bin/python bench/serve.py                       # untrained `tiny` preset, 28x28x1
    .venv/bin/python bench/serve.py --checkpoint default --requests 256
    .venv/bin/python bench/serve.py --checkpoint default --defaults --skip-onnx   # README
    .venv/bin/python bench/serve.py --ladder        # the whole ladder, floor to model (ladder.py)

`--defaults`: the checkpoint's default options as a plain request gets them (its solver, max_iter
and tol, the settled exit), on Fashion-MNIST test images when present (else random PNGs), so the
numbers are those of a default request; the c=1 row then also gives the HTTP overhead per request
(HTTP p50 - in-process p50).

Part 1, same work on both sides: PNG bytes -> `decode_image` -> the torch engine at a fixed
budget (tol tiny, so every image runs `--max-iter` iterations). In-process runs batches of c
images; HTTP sends single-image POST /classify requests with c in flight (asyncio client), which
the server's adaptive batching groups. Printed: images/s, latency p50/p99 (per batch in-process,
per request over HTTP), and HTTP / in-process ratios.

Part 2: the naive solver at the same iterations and batch, torch eager vs the exported ONNX graph
under onnxruntime (both one intra-op thread unless --threads), as images/s and a ratio.

Everything runs in one invocation on one machine, so the ratios compare like with like. The
client shares the CPU with the server: on a small machine that costs the HTTP side, and the
httpx client (the default, as the ladder's) costs several times the CPU per request of aiohttp's
(`--client aiohttp`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402


def _checkpoint(arg: str | None, tmp: Path) -> str:
    """The given checkpoint, else `default` when shipped, else an untrained tiny preset (the
    same compute as a trained one; only the answers are meaningless)."""
    from deqguard.models import build_model, resolve_checkpoint, save_checkpoint

    if arg:
        return arg
    if resolve_checkpoint("default").exists():
        return "default"
    path = tmp / "tiny-untrained.safetensors"
    save_checkpoint(build_model("tiny", num_classes=10, in_channels=1, image_size=28).eval(),
                    path, {"name": "tiny-untrained"})
    return str(path)


def _fashion_pngs(n: int) -> list[bytes] | None:
    """The first n Fashion-MNIST test images as PNG bytes, or None when the data is absent."""
    from PIL import Image

    try:
        from deqguard.training.data import load_dataset

        ds = load_dataset("fashion-mnist", "test", limit=n)
    except Exception:
        return None
    out = []
    for i in range(len(ds)):
        arr = (np.asarray(ds[i][0])[0] * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _pngs(n: int, spec, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape = (spec.height, spec.width) + (() if spec.channels == 1 else (3,))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def in_process(engine, pngs: list[bytes], batch: int, opts) -> tuple[float, list[float]]:
    from deqguard.serving.images import decode_image

    s = engine.spec
    lat = []
    t0 = time.perf_counter()
    for i in range(0, len(pngs), batch):
        t = time.perf_counter()
        x = np.stack([decode_image(p, channels=s.channels, height=s.height, width=s.width)
                      for p in pngs[i:i + batch]])
        engine.classify(x, opts)
        lat.append(time.perf_counter() - t)
    return len(pngs) / (time.perf_counter() - t0), lat


async def over_http(url: str, pngs: list[bytes], concurrency: int, body: dict,
                    client_name: str = "httpx") -> tuple[float, list[float]]:
    texts = [base64.b64encode(p).decode() for p in pngs]
    lat: list[float] = []
    queue = list(range(len(texts)))
    if client_name == "aiohttp":
        return await _over_aiohttp(url, texts, concurrency, body, queue, lat)
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                r = await client.post("/classify", json={"image": texts[i], **body})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - t0), lat


async def _over_aiohttp(url: str, texts: list[str], concurrency: int, body: dict,
                        queue: list[int], lat: list[float]) -> tuple[float, list[float]]:
    """The same load from aiohttp's client: on a small machine the client shares the cores with
    the server, and httpx spends several times more CPU per request (measured in
    docs/eval/wk/default/bench/gap-profile.md)."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, connector=conn, timeout=timeout) as session:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                async with session.post("/classify", json={"image": texts[i], **body}) as r:
                    r.raise_for_status()
                    await r.read()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - t0), lat


def torch_vs_onnx(checkpoint: str, tmp: Path, iters: int, batch: int, repeats: int,
                  threads: int) -> tuple[float, float, str]:
    from deqguard.serving.onnx_engine import OnnxEngine
    from deqguard.serving.onnx_export import export_onnx
    from deqguard.serving.options import SolveOptions
    from deqguard.serving.torch_engine import TorchEngine

    info = export_onnx(checkpoint, tmp / "bench.onnx", iterations=iters)
    te = TorchEngine.load(checkpoint, device="cpu", threads=threads, max_iter_cap=iters)
    oe = OnnxEngine(tmp / "bench.onnx", device="cpu", threads=threads, max_iter_cap=iters)
    s = te.spec
    x = np.random.default_rng(1).uniform(0, 1, (batch, s.channels, s.height, s.width))
    x = x.astype(np.float32)
    opts = SolveOptions(max_iter=iters, tol=1e-12, solver="naive")
    best = [float("inf"), float("inf")]
    for eng in (te, oe):
        eng.trace(x, opts)  # warm-up
    for _ in range(repeats):  # interleaved, so that load drifts hit both alike
        for k, eng in enumerate((te, oe)):
            t = time.perf_counter()
            eng.trace(x, opts)
            best[k] = min(best[k], time.perf_counter() - t)
    return batch / best[0], batch / best[1], info["exporter"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--ladder" in argv:  # its own options: `serve.py --ladder --help`
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import ladder

        return ladder.main([a for a in argv if a != "--ladder"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ladder", action="store_true",
                   help="run bench/ladder.py instead: the framework floor, deqguard on the CNN "
                        "and the default, and the in-process engines, interleaved over rounds")
    p.add_argument("--checkpoint", help="checkpoint (default: `default`, else untrained tiny)")
    p.add_argument("--requests", type=int, default=128, help="images per concurrency level")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-iter", type=int, default=15)
    p.add_argument("--solver", default=None, help="solver for part 1 (checkpoint default)")
    p.add_argument("--onnx-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--server-log", default=None, help="keep the server's log here")
    p.add_argument("--defaults", action="store_true",
                   help="default request options and Fashion-MNIST images (see above)")
    p.add_argument("--skip-onnx", action="store_true", help="skip part 2")
    p.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx",
                   help="HTTP client of the load (aiohttp: less of the shared CPU for itself)")
    args = p.parse_args(argv)

    import torch

    from deqguard.serving.launch import serve_subprocess
    from deqguard.serving.torch_engine import TorchEngine, set_torch_threads

    set_torch_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="deqguard-bench-") as d:
        tmp = Path(d)
        ckpt = _checkpoint(args.checkpoint, tmp)
        engine = TorchEngine.load(ckpt, device="cpu", threads=args.threads)
        if args.defaults:
            opts, body = engine.resolve(), {}
            pngs = _fashion_pngs(args.requests) or _pngs(args.requests, engine.spec)
            print(f"checkpoint {engine.meta.name or ckpt}  default options {opts}  threads "
                  f"{args.threads}  torch {torch.__version__}  cpus {os.cpu_count()}")
        else:
            opts = engine.resolve(max_iter=args.max_iter, tol=1e-12, solver=args.solver,
                                  settle_iters=0)
            body = {"max_iter": opts.max_iter, "tol": 1e-12, "solver": opts.solver,
                    "trajectory": True, "settle_iters": 0}
            pngs = _pngs(args.requests, engine.spec)
            print(f"checkpoint {engine.meta.name or ckpt}  solver {opts.solver}  max_iter "
                  f"{opts.max_iter} (tol 1e-12: every image runs them all)  threads "
                  f"{args.threads}  torch {torch.__version__}  cpus {os.cpu_count()}")

        rows = []
        in_process(engine, pngs[:8], 8, opts)  # warm-up
        log = args.server_log or tmp / "server.log"
        with serve_subprocess(ckpt, log, threads=args.threads) as url:
            asyncio.run(over_http(url, pngs[:16], 4, body, args.client))  # warm-up
            for c in levels:
                ip_rate, ip_lat = in_process(engine, pngs, c, opts)
                http_rate, http_lat = asyncio.run(over_http(url, pngs, c, body, args.client))
                rows.append((c, ip_rate, _pct(ip_lat, 50), _pct(ip_lat, 99), http_rate,
                             _pct(http_lat, 50), _pct(http_lat, 99)))
        print("\nPart 1: in-process (batches of c) vs HTTP (c single-image requests in flight)")
        print("| c | in-process img/s | p50 ms | p99 ms | HTTP img/s | p50 ms | p99 ms "
              "| HTTP / in-process |")
        print("|---|---|---|---|---|---|---|---|")
        for c, a, a50, a99, h, h50, h99 in rows:
            print(f"| {c} | {a:.1f} | {a50:.1f} | {a99:.1f} | {h:.1f} | {h50:.1f} | {h99:.1f} "
                  f"| {h / a:.2f}x |")
        c1 = [r for r in rows if r[0] == 1]
        if c1:
            print(f"\nHTTP overhead per request at c=1: {c1[0][5] - c1[0][2]:.1f} ms (p50)")
        if args.skip_onnx:
            return 0

        t_rate, o_rate, exporter = torch_vs_onnx(ckpt, tmp, args.max_iter, args.onnx_batch,
                                                 args.repeats, args.threads)
        print(f"\nPart 2: naive solver, {args.max_iter} iterations, batch {args.onnx_batch}, "
              f"best of {args.repeats} (ONNX exporter: {exporter})")
        print("| backend | img/s | vs torch |")
        print("|---|---|---|")
        print(f"| torch eager | {t_rate:.1f} | 1.00x |")
        print(f"| onnxruntime CPU | {o_rate:.1f} | {o_rate / t_rate:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
