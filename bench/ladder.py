"""The serving ladder in one run: what a served answer costs next to the framework and the model.

    .venv/bin/python bench/serve.py --ladder                      # the full measurement
    .venv/bin/python bench/serve.py --ladder --synthetic --requests 16 --rounds 2

Rows, all with the same asyncio httpx client and the same images (the first N Fashion-MNIST test
images as PNGs, or generated PNGs with --synthetic):
  floor             a minimal BentoML service (bench/floor_service.py): deqguard's decoding and
                    an answer of deqguard's size (a real one, captured from the default server),
                    no model
  deqguard+CNN      `bentoml serve` of deqguard on the anchor CNN checkpoint (--cnn)
  deqguard+default  the same on the default checkpoint (--model)
  in-process CNN / in-process default
                    the torch engine in this process: decode, classify in batches of c, answers as
                    JSON-ready dicts (no HTTP, so one row serves both formats)
HTTP rows run once with JSON bodies and once with multipart uploads, at each concurrency c.

Measurements on a shared machine drift by up to 2x from one minute to the next, so a ratio is
only worth something between rows measured close together: every round measures every row once
(odd rounds in reverse order, so drift hits the rows alike), and the table gives the median over
rounds and its min-max spread; ratios are taken within a round, then summarised the same way.
Servers start once (sequentially, 127.0.0.1, free ports), serve every round and are stopped at
the end, also on errors. Each measurement stops at --requests images or --row-timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
CNN = str(BENCH.parent / "runs/long/fashion-cnn-wk/best.safetensors")
FORMATS = ("json", "multipart")
FLOOR, DQ_CNN, DQ_DEF, IP_CNN, IP_DEF = ("floor", "deqguard+CNN", "deqguard+default",
                                          "in-process CNN", "in-process default")


@dataclass
class Row:
    """One rung of the ladder: an HTTP server (url and routes) or an in-process engine."""

    name: str
    url: str | None = None
    routes: dict[str, str] = field(default_factory=dict)
    engine: Any = None
    opts: Any = None
    answer_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS if self.url else ("-",)


@dataclass
class Sample:
    rate: float
    lat: list[float]
    done: int


async def _http(row: Row, fmt: str, pngs: list[bytes], texts: list[str], n: int, c: int,
                limit_s: float, client_name: str = "httpx") -> Sample:
    """n single-image POSTs with c in flight; stops starting new ones after limit_s."""
    lat: list[float] = []
    route = row.routes[fmt]
    next_i = 0
    deadline = time.perf_counter() + limit_s
    post = _aiohttp_post if client_name == "aiohttp" else _httpx_post
    async with post(row.url, c) as send:
        async def worker() -> None:
            nonlocal next_i
            while next_i < n and time.perf_counter() < deadline:
                i = next_i % len(pngs)
                next_i += 1
                t = time.perf_counter()
                body = await send(route, fmt, pngs[i], texts[i])
                row.answer_bytes.setdefault(fmt, len(body))
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        return Sample(len(lat) / (time.perf_counter() - t0), lat, len(lat))


@contextlib.asynccontextmanager
async def _httpx_post(url: str, c: int):
    """A sender on httpx's client (the one deqguard's Python client is built on)."""
    import httpx

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def send(route: str, fmt: str, png: bytes, text: str) -> bytes:
            if fmt == "json":
                r = await client.post(route, json={"image": text})
            else:
                r = await client.post(route, files={"image": ("x.png", png, "image/png")})
            r.raise_for_status()
            return r.content

        yield send


@contextlib.asynccontextmanager
async def _aiohttp_post(url: str, c: int):
    """A sender on aiohttp's client: it spends several times less CPU per request than httpx,
    which matters when the client shares the cores with the server it measures
    (docs/eval/wk/default/bench/gap-profile.md)."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(url, connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def send(route: str, fmt: str, png: bytes, text: str) -> bytes:
            if fmt == "json":
                kwargs = {"json": {"image": text}}
            else:
                form = aiohttp.FormData()
                form.add_field("image", png, filename="x.png", content_type="image/png")
                kwargs = {"data": form}
            async with session.post(route, **kwargs) as r:
                r.raise_for_status()
                return await r.read()

        yield send


def _in_process(row: Row, pngs: list[bytes], n: int, c: int, limit_s: float) -> Sample:
    """Batches of c: decode (the server's decode_image), classify, answers as JSON-ready dicts
    (what the model service sends back); stops starting new batches after limit_s."""
    from deqguard.serving.images import decode_image

    s = row.engine.spec
    lat: list[float] = []
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + limit_s
    while done < n and time.perf_counter() < deadline:
        k = min(c, n - done)
        t = time.perf_counter()
        x = np.stack([decode_image(pngs[(done + j) % len(pngs)], channels=s.channels,
                                   height=s.height, width=s.width) for j in range(k)])
        answers = [a.model_dump(mode="json") for a in row.engine.classify(x, row.opts)]
        lat.append(time.perf_counter() - t)
        row.answer_bytes.setdefault("-", len(json.dumps(answers[0], separators=(",", ":"))))
        done += k
    return Sample(done / (time.perf_counter() - t0), lat, done)


def measure(row: Row, fmt: str, pngs: list[bytes], texts: list[str], n: int, c: int,
            limit_s: float, client_name: str = "httpx") -> Sample:
    if row.url:
        return asyncio.run(_http(row, fmt, pngs, texts, n, c, limit_s, client_name))
    return _in_process(row, pngs, n, c, limit_s)


def _cpus(text: str | None) -> set[int] | None:
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@contextlib.contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block on `cpus` (children started in it inherit them, as taskset would give)."""
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _pngs(n: int, synthetic: bool) -> tuple[list[bytes], str]:
    import serve  # bench/serve.py: the same image sources as its other parts

    class Spec:
        channels, height, width = 1, 28, 28

    if not synthetic:
        found = serve._fashion_pngs(n)
        if found:
            return found, f"the first {len(found)} Fashion-MNIST test images (PNG)"
    return serve._pngs(n, Spec), f"{n} generated 28x28 grey PNGs"


def _fmt_range(xs: list[float]) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}"


def _ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def report(rows: list[Row], levels: list[int], results: dict[tuple[str, str, int], list[Sample]],
           rounds_done: int) -> None:
    """The table (median over rounds, min-max spread, latency pooled over rounds) and the
    ratios (per round, then median [min-max])."""
    print(f"\nLadder: {rounds_done} rounds; img/s median and min-max over rounds; latency p50/p99 "
          "over all requests of all rounds (per batch of c for in-process rows)")
    print("| row | format | c | img/s | min-max | p50 ms | p99 ms | answer bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        for row in rows:
            for fmt in row.formats:
                got = results.get((row.name, fmt, c), [])
                if not got:
                    continue
                rates = [s.rate for s in got]
                lat = [x for s in got for x in s.lat]
                print(f"| {row.name} | {fmt} | {c} | {statistics.median(rates):.1f} | "
                      f"{_fmt_range(rates)} | {_ms(lat, 50):.1f} | {_ms(lat, 99):.1f} | "
                      f"{row.answer_bytes.get(fmt, 0)} |")

    pairs = [(DQ_CNN, FLOOR), (DQ_DEF, FLOOR), (DQ_CNN, IP_CNN), (DQ_DEF, IP_DEF)]
    print("\nRatios of img/s (a over b), taken within each round: median [min-max]")
    print("| c | format | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    for c in levels:
        for fmt in FORMATS:
            cells = []
            for a, b in pairs:
                fb = fmt if b == FLOOR else "-"
                ra, rb = results.get((a, fmt, c), []), results.get((b, fb, c), [])
                ratios = [x.rate / y.rate for x, y in zip(ra, rb, strict=True) if y.rate > 0]
                cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-"
                             f"{max(ratios):.2f}]" if ratios else "n/a")
            print(f"| {c} | {fmt} | " + " | ".join(cells) + " |")


def _capture_answer(url: str, png: bytes, path: Path) -> None:
    """One real deqguard answer, for the floor to send back (the same size and shape)."""
    import httpx

    r = httpx.post(url + "/classify", json={"image": base64.b64encode(png).decode()},
                   timeout=300)
    r.raise_for_status()
    path.write_bytes(r.content)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve.py --ladder", description=__doc__.split("\n")[0])
    p.add_argument("--cnn", default=CNN,
                   help="the anchor CNN checkpoint (default runs/long/fashion-cnn-wk)")
    p.add_argument("--model", default="default", help="the default model (default `default`)")
    p.add_argument("--requests", type=int, default=128, help="images per measurement")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every row (at least 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, servers and engines")
    p.add_argument("--synthetic", action="store_true", help="generated PNGs, not Fashion-MNIST")
    p.add_argument("--server-cpus", default=None, help="pin the servers to these CPUs (0 or 0-1)")
    p.add_argument("--client-cpus", default=None, help="pin this client process to these CPUs")
    p.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx",
                   help="HTTP client of the load (aiohttp: less of the shared CPU for itself)")
    p.add_argument("--row-timeout", type=float, default=120.0,
                   help="seconds one measurement may take before it stops sending")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="no new round starts after this many seconds")
    p.add_argument("--log-dir", default=None, help="keep the servers' logs here")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.requests < 1:
        p.error("--rounds must be at least 2 and --requests at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    from deqguard.serving.launch import serve_subprocess
    from deqguard.serving.torch_engine import TorchEngine, set_torch_threads

    started = time.monotonic()
    load0 = os.getloadavg()
    server_cpus, client_cpus = _cpus(args.server_cpus), _cpus(args.client_cpus)
    set_torch_threads(args.threads)
    pngs, source = _pngs(args.requests, args.synthetic)
    texts = [base64.b64encode(x).decode() for x in pngs]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deqguard-ladder-")))
        logs = Path(args.log_dir) if args.log_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        with _affinity(server_cpus):  # servers start one after the other, inheriting the pin
            url_def = stack.enter_context(serve_subprocess(
                args.model, logs / "deqguard-default.log", threads=args.threads))
            url_cnn = stack.enter_context(serve_subprocess(
                args.cnn, logs / "deqguard-cnn.log", threads=args.threads))
            _capture_answer(url_def, pngs[0], tmp / "answer.json")
            url_floor = stack.enter_context(serve_subprocess(
                args.model, logs / "floor.log", threads=args.threads, cwd=str(BENCH),
                service="floor_service:Floor", DEQGUARD_FLOOR_ANSWER=str(tmp / "answer.json")))
        if client_cpus is not None:
            os.sched_setaffinity(0, client_cpus)
        dq = {"json": "/classify", "multipart": "/classify"}
        rows = [Row(FLOOR, url_floor, {"json": "/classify", "multipart": "/classify_upload"}),
                Row(DQ_CNN, url_cnn, dq), Row(DQ_DEF, url_def, dq)]
        for name, ckpt in ((IP_CNN, args.cnn), (IP_DEF, args.model)):
            eng = TorchEngine.load(ckpt, device="cpu", threads=args.threads)
            rows.append(Row(name, engine=eng, opts=eng.resolve()))

        print(f"images: {source}; requests per measurement {args.requests}; concurrency "
              f"{levels}; torch {torch.__version__}; {os.cpu_count()} CPUs")
        print(f"cores: servers {sorted(server_cpus) if server_cpus else 'unpinned'}, each "
              f"`bentoml serve` with 1 worker (deqguard: one process, the model on its own "
              f"thread; floor: 1 process), {args.threads} intra-op thread(s); client: this one "
              f"process "
              f"(asyncio {args.client}, and the in-process engines at {args.threads} thread(s)) on "
              f"{sorted(client_cpus) if client_cpus else 'unpinned'} CPUs"
              + ("" if server_cpus or client_cpus else "; no taskset: all share every core"))
        print("load average at start: " + " ".join(f"{x:.2f}" for x in load0))

        units = [(row, fmt, c) for c in levels for row in rows for fmt in row.formats]
        for row, fmt, _ in units:  # warm-up: connections, batching dispatcher, allocators
            measure(row, fmt, pngs, texts, min(8, args.requests), 4, args.row_timeout,
                    args.client)
        results: dict[tuple[str, str, int], list[Sample]] = {}
        rounds_done = 0
        for r in range(args.rounds):
            if time.monotonic() - started > args.time_limit:
                print(f"time limit: stopped after {rounds_done} rounds")
                break
            for row, fmt, c in (units if r % 2 == 0 else units[::-1]):
                s = measure(row, fmt, pngs, texts, args.requests, c, args.row_timeout,
                            args.client)
                if s.done < args.requests:
                    print(f"note: {row.name} {fmt} c={c} round {r + 1}: {s.done} of "
                          f"{args.requests} images within --row-timeout")
                results.setdefault((row.name, fmt, c), []).append(s)
            rounds_done += 1
        report(rows, levels, results, rounds_done)
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
