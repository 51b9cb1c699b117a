"""Where the time goes between c single-image HTTP requests and the in-process engine. Not a test.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gap_probe.py --requests 512 --concurrency 32
    OMP_NUM_THREADS=1 .venv/bin/python bench/gap_probe.py --floor       # the framework floor
    OMP_NUM_THREADS=1 .venv/bin/python bench/gap_probe.py --curve       # in-process costs only

Serves the real deqguard service (this module re-exports it, with timers wrapped around the
micro-batcher's model calls when GAP_PROBE_LOG names a file), loads it with the same asyncio
httpx client as the ladder, and prints, per round and interleaved with the in-process engine
(batches of c: decode, classify, answers as dicts, as ladder.py's in-process row):
- the batch sizes the micro-batcher formed (from the compute thread's own log);
- the compute thread's time per call: engine (classify_grouped) vs answer building, and the
  share of wall time it sat idle waiting for work;
- CPU seconds per request of the client (this process) and of the server (all its processes),
  and the server's split between its compute thread and everything else (the event loop).
`--variants` serves several servers side by side and measures them in alternating order each
round: `old` is the batcher that never waits to fill (max_wait_s 0), `fill` the shipped one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def _install(log_path: str) -> None:
    """Time each model call on the compute thread (engine vs answers) and the gaps between."""
    from deqguard.serving import engine as engine_mod
    from deqguard.serving.batcher import MicroBatcher

    out = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the server
    state = {"end": None, "engine": 0.0}
    lock = threading.Lock()
    orig_call = MicroBatcher._call
    orig_grouped = engine_mod.ModelEngine.classify_grouped

    def grouped(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig_grouped(self, *a, **k)
        finally:
            state["engine"] += time.perf_counter() - t

    def call(self, jobs):
        t0, c0 = time.perf_counter(), time.thread_time()
        idle = None if state["end"] is None else t0 - state["end"]
        state["engine"] = 0.0
        orig_call(self, jobs)
        t1 = time.perf_counter()
        with lock:
            out.write(json.dumps({
                "t0": t0, "t1": t1, "idle": idle, "size": sum(len(j.items) for j in jobs),
                "jobs": len(jobs), "wall": t1 - t0, "cpu": time.thread_time() - c0,
                "engine": state["engine"], "tid": threading.get_native_id()}) + "\n")
        state["end"] = t1

    MicroBatcher._call = call
    engine_mod.ModelEngine.classify_grouped = grouped
    if os.environ.get("GAP_PROBE_NOFILL"):  # the batcher as it was: never waits to fill
        orig_init = MicroBatcher.__init__

        def init(self, *a, **k):
            orig_init(self, *a, **{**k, "max_wait_s": 0.0})

        MicroBatcher.__init__ = init
    if os.environ.get("GAP_PROBE_SWITCH"):
        sys.setswitchinterval(float(os.environ["GAP_PROBE_SWITCH"]))


if os.environ.get("GAP_PROBE_LOG"):
    _install(os.environ["GAP_PROBE_LOG"])

if __name__ != "__main__":
    from deqguard.serving.service import DEQGuard  # noqa: E402 - what `bentoml serve` finds

    if os.environ.get("GAP_PROBE_WORKERS"):  # an experiment: N processes, a model in each
        DEQGuard.config["workers"] = int(os.environ["GAP_PROBE_WORKERS"])


def _server_cpu(root_pid: int, compute_tid: int | None) -> tuple[float, float]:
    """(all server processes' CPU seconds, the compute thread's) so far."""
    import psutil

    total, compute = 0.0, 0.0
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
            if compute_tid is not None:
                for th in p.threads():
                    if th.id == compute_tid:
                        compute = th.user_time + th.system_time
        except psutil.NoSuchProcess:
            pass
    return total, compute


async def _http(url: str, texts: list[str], n: int, c: int) -> float:
    if CLIENT == "aiohttp":
        return await _aiohttp(url, texts, n, c)
    import httpx

    next_i = 0
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i % len(texts)
                next_i += 1
                r = await client.post("/classify", json={"image": texts[i]})
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        return n / (time.perf_counter() - t0)


async def _aiohttp(url: str, texts: list[str], n: int, c: int) -> float:
    """The same load from aiohttp's client, to see what the client's own CPU costs."""
    import aiohttp

    next_i = 0
    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(url, connector=conn) as session:
        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i % len(texts)
                next_i += 1
                async with session.post("/classify", json={"image": texts[i]}) as r:
                    r.raise_for_status()
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        return n / (time.perf_counter() - t0)


CLIENT = "httpx"


def _in_process(engine, opts, pngs: list[bytes], n: int, c: int) -> tuple[float, float]:
    """img/s and CPU s per image of ladder.py's in-process row."""
    import numpy as np

    from deqguard.serving.images import decode_image

    s = engine.spec
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    while done < n:
        k = min(c, n - done)
        x = np.stack([decode_image(pngs[(done + j) % len(pngs)], channels=s.channels,
                                   height=s.height, width=s.width) for j in range(k)])
        [a.model_dump(mode="json") for a in engine.classify(x, opts)]
        done += k
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def _calls(path: Path, since: float) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["t0"] >= since]


def _uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _round(name: str, url: str, root: int, tid: int | None, log: Path, texts: list[str], n: int,
           c: int, ip_rate: float) -> None:
    import numpy as np

    s0, k0 = _server_cpu(root, tid)
    c0, t0 = time.process_time(), time.perf_counter()
    rate = asyncio.run(_http(url, texts, n, c))
    client_cpu = time.process_time() - c0
    wall = time.perf_counter() - t0
    s1, k1 = _server_cpu(root, tid)
    print(f"  [{name}] HTTP {rate:.1f} img/s  ratio to in-process {rate / ip_rate:.2f}x")
    print(f"    CPU ms per request: client {1000 * client_cpu / n:.2f}  server "
          f"{1000 * (s1 - s0) / n:.2f} (compute thread {1000 * (k1 - k0) / n:.2f}, "
          f"rest {1000 * ((s1 - s0) - (k1 - k0)) / n:.2f}); cores used "
          f"{(client_cpu + s1 - s0) / wall:.2f} of {os.cpu_count()}")
    calls = _calls(log, t0)
    if not calls:
        return
    sizes = np.array([r["size"] for r in calls])
    busy = sum(r["wall"] for r in calls)
    eng = sum(r["engine"] for r in calls)
    idle = sum(r["idle"] for r in calls[1:])
    hist = np.bincount(sizes)
    print(f"    model calls {len(calls)}  batch size mean {sizes.mean():.1f} median "
          f"{np.median(sizes):.0f} p10 {np.percentile(sizes, 10):.0f} p90 "
          f"{np.percentile(sizes, 90):.0f}; sizes (size:calls) "
          + " ".join(f"{k}:{v}" for k, v in enumerate(hist) if v))
    print(f"    compute thread: in calls {busy:.2f} s of {wall:.2f} s wall "
          f"({100 * busy / wall:.0f}%), between calls {idle:.2f} s; engine {eng:.2f} s "
          f"({1000 * eng / sizes.sum():.2f} ms/img wall), answers+delivery {busy - eng:.2f} s "
          f"({1000 * (busy - eng) / sizes.sum():.2f} ms/img)")


def curve(engine, opts, pngs: list[bytes]) -> None:
    """In-process only: the engine's CPU per image by batch size, and what building the answers
    (and the solve metrics) costs per image, on the compute thread's own code path."""
    import numpy as np

    from deqguard.serving import metrics
    from deqguard.serving.images import decode_image

    s = engine.spec
    x = np.stack([decode_image(p, channels=s.channels, height=s.height, width=s.width)
                  for p in pngs])
    n = len(x)
    for b in (8, 16, 32, 64):
        best = float("inf")
        for _ in range(2):
            c0 = time.process_time()
            for i in range(0, n, b):
                engine.trace(x[i:i + b], opts)
            best = min(best, (time.process_time() - c0) / n)
        print(f"batch {b}: engine (trace) CPU {1000 * best:.2f} ms/img")
    traces = engine.trace(x[:32], opts)
    c0 = time.process_time()
    results = [engine.result(t, opts, True) for t in traces]
    c1 = time.process_time()
    [r.model_dump(mode="json") for r in results]
    c2 = time.process_time()
    metrics.observe("torch", [(t, opts, r) for t, r in zip(traces, results, strict=True)])
    c3 = time.process_time()
    k = 1000 / len(traces)
    print(f"answers: result() {k * (c1 - c0):.3f} ms/img, model_dump {k * (c2 - c1):.3f}, "
          f"solve metrics {k * (c3 - c2):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="old,fill",
                   help="servers to compare, interleaved: old (the batcher never waits to "
                        "fill), fill, old-switch and fill-switch (sys.setswitchinterval 0.5 ms)")
    p.add_argument("--curve", action="store_true",
                   help="in-process only: engine CPU per image by batch size, answer cost")
    p.add_argument("--floor", action="store_true",
                   help="serve bench/floor_service.py (no model: the framework floor) instead")
    p.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx",
                   help="the load's HTTP client (httpx: the ladder's)")
    args = p.parse_args(argv)
    global CLIENT
    CLIENT = args.client

    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import _fashion_pngs

    from deqguard.serving.launch import serve_subprocess
    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(args.checkpoint, device="cpu", threads=1)
    opts = engine.resolve()
    pngs = _fashion_pngs(args.requests)
    texts = [base64.b64encode(b).decode() for b in pngs]
    n, c = args.requests, args.concurrency
    print(f"$ OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python "
          f"bench/gap_probe.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"checkpoint {args.checkpoint}  options {opts}  requests {n}  c {c}")
    print("uptime:", _uptime())
    if args.curve:
        engine.warm_up()
        curve(engine, opts, pngs)
        return 0
    bench_dir = Path(__file__).resolve().parent
    variants = {"old": {"GAP_PROBE_NOFILL": "1"}, "fill": {},
                "old-switch": {"GAP_PROBE_NOFILL": "1", "GAP_PROBE_SWITCH": "0.0005"},
                "fill-switch": {"GAP_PROBE_SWITCH": "0.0005"},
                "fill-2w": {"GAP_PROBE_WORKERS": "2"}}
    names = ["floor"] if args.floor else args.variants.split(",")
    servers = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gap-probe-{os.getpid()}-{name}.jsonl"
            log.write_text("")
            service = "floor_service:Floor" if args.floor else "gap_probe:DEQGuard"
            before = {ch.pid for ch in psutil.Process().children()}
            url = stack.enter_context(serve_subprocess(
                args.checkpoint, log.with_suffix(".server.log"), threads=1, service=service,
                cwd=str(bench_dir), GAP_PROBE_LOG=str(log), **variants.get(name, {})))
            root = [ch.pid for ch in psutil.Process().children() if ch.pid not in before][0]
            asyncio.run(_http(url, texts[:64], 64, c))  # warm-up
            tid = _calls(log, 0)[-1]["tid"] if not args.floor else None
            servers[name] = (url, root, tid, log)
        _in_process(engine, opts, pngs[:64], 64, c)
        for rnd in range(args.rounds):
            ip_rate, ip_cpu = _in_process(engine, opts, pngs, n, c)
            print(f"\nround {rnd + 1}: in-process (batches of {c}) {ip_rate:.1f} img/s, CPU "
                  f"{1000 * ip_cpu:.2f} ms/img   uptime: " + _uptime())
            for name in (names if rnd % 2 == 0 else names[::-1]):
                _round(name, *servers[name], texts, n, c, ip_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
