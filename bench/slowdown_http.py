"""Slowdown inputs over HTTP: clean requests' latency while a share of the traffic is inputs
crafted to stall the solver, with and without the server's protections. Not a test.

    .venv/bin/python bench/slowdown_http.py --checkpoint default \\
        --adv runs/slowdown/default/slowdown-anderson.npz      # from deqguard eval --slowdown-save

Without --adv the attacked images are crafted here (`--craft-n` test images, the checkpoint's
solver, APGD on the residual after half its max_iter iterations, as `deqguard eval --attacks
slowdown`) and saved with --save. They are sent as the 8-bit PNGs a client uploads (each pixel
kept inside the eps-ball), so the script first reports, in-process, how many iterations those
PNGs need next to the clean ones.

Traffic: --concurrency clients in a closed loop send --requests single-image POST /classify per
mix, interleaved over --rounds:
  clean     every request a clean test image with the default options;
  cap       --share of them a clean image asking max_iter = the server's cap (what a caller may
            ask; --attack-max-iter lowers it), the rest clean: the control for
  slowdown  --share of them an attacked image asking the same, the rest clean (requests with
            other options run as their own sub-batch, so `cap` is what the options alone cost);
  options   --share of them a clean image asking max_iter = the cap and tol 1e-12: the cost any
            caller can force without an attack, for comparison.
Servers: `open` (the defaults: cap 100, no budget) and `protected` (DEQGUARD_MAX_ITER_CAP =
--protected-cap, the checkpoint's max_iter unless set, and DEQGUARD_REQUEST_BUDGET_MS =
--budget-ms, by default twice the clean p99 measured on the open server). Printed per server and
mix: clean requests' p50 / p99 and p99 against the clean-only mix of the same server, the share
of clean answers the budget cut, and the other requests' p50. Target: clean p99 with 20% slowdown
traffic at most 1.5x the clean-only p99.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _fashion_pngs, _pct  # noqa: E402

MIXES = ("clean", "cap", "slowdown", "options")


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    arr = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def attacked_pngs(args, ckpt: str) -> list[bytes]:
    """The attacked images as PNG bytes: from --adv, else crafted here (and saved with --save)."""
    if args.adv:
        return [_png(a) for a in np.load(args.adv)["x_adv_uint8"]]
    import torch

    from deqguard.evaluation.slowdown import slowdown_attack
    from deqguard.evaluation.slowdown_part import default_k, save_attacked
    from deqguard.models import load_checkpoint
    from deqguard.models.defense import default_eps
    from deqguard.training.data import load_dataset

    model, meta = load_checkpoint(ckpt, device="cpu")
    ds = load_dataset("fashion-mnist", "test", limit=args.craft_n)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    eps = default_eps(meta.input.channels, meta.input.height)
    k = default_k(model)
    t0 = time.perf_counter()
    x_adv, _ = slowdown_attack(model.eval(), x, eps=eps, k=k, steps=args.craft_steps,
                               generator=torch.Generator().manual_seed(0))
    print(f"crafted {len(x)} slowdown inputs (k={k}, {args.craft_steps} steps, eps {eps:g}) "
          f"in {time.perf_counter() - t0:.0f} s")
    folder = Path(args.save or tempfile.mkdtemp(prefix="deqguard-slowdown-"))
    path = save_attacked(folder, model.config.solver.solver, x, x_adv, y, eps=eps, k=k)
    print(f"saved to {path}")
    return [_png(a) for a in np.load(path)["x_adv_uint8"]]


def in_process_check(ckpt: str, clean: list[bytes], adv: list[bytes], cap: int) -> None:
    """Iterations the PNGs need in the served engine, at the default options and at the cap."""
    from deqguard.serving.images import decode_image
    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(ckpt, device="cpu", threads=1)
    s = engine.spec

    def stack(pngs):
        return np.stack([decode_image(p, channels=s.channels, height=s.height, width=s.width)
                         for p in pngs])

    n = min(len(clean), len(adv))
    for label, opts in (("default options", engine.resolve()),
                        (f"max_iter {cap}", engine.resolve(max_iter=min(cap, 100)))):
        for name, pngs in (("clean", clean[:n]), ("slowdown", adv[:n])):
            its = np.array([r.iterations for r in engine.classify(stack(pngs), opts)])
            print(f"in-process, {label}: {name} {n} images, iterations mean {its.mean():.1f} "
                  f"p90 {np.percentile(its, 90):.0f} max {its.max()}")


def plan(mix: str, n: int, share: float, seed: int) -> list[bool]:
    """Which of n requests are the mix's other kind (every 1/share-th, from a seeded offset)."""
    if mix == "clean" or share <= 0:
        return [False] * n
    every = max(1, round(1 / share))
    offset = int(np.random.default_rng(seed).integers(every))
    return [(i + offset) % every == 0 for i in range(n)]


async def run_mix(url: str, clean: list[str], adv: list[str], mix: str, n: int, share: float,
                  concurrency: int, cap: int, seed: int) -> dict:
    import httpx

    other = plan(mix, n, share, seed)
    order = list(range(n))
    lat: dict[str, list[float]] = {"clean": [], "other": []}
    cut = {"clean": 0, "other": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            while order:
                i = order.pop(0)
                if not other[i]:
                    kind, body = "clean", {"image": clean[i % len(clean)]}
                elif mix == "slowdown":
                    kind, body = "other", {"image": adv[i % len(adv)], "max_iter": cap}
                elif mix == "cap":
                    kind, body = "other", {"image": clean[(i + 7) % len(clean)], "max_iter": cap}
                else:
                    kind, body = "other", {"image": clean[(i + 7) % len(clean)],
                                           "max_iter": cap, "tol": 1e-12}
                t = time.perf_counter()
                r = await client.post("/classify", json=body)
                r.raise_for_status()
                lat[kind].append(time.perf_counter() - t)
                cut[kind] += r.json().get("stopped") == "budget"

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"mix": mix, "lat": lat, "cut": cut, "wall": wall, "n": n}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for mix in MIXES:
        rs = [r for r in runs if r["mix"] == mix]
        if not rs:
            continue
        clean = [x for r in rs for x in r["lat"]["clean"]]
        other = [x for r in rs for x in r["lat"]["other"]]
        out[mix] = {"clean_p50_ms": _pct(clean, 50), "clean_p99_ms": _pct(clean, 99),
                    "clean_n": len(clean),
                    "clean_cut_share": sum(r["cut"]["clean"] for r in rs) / max(len(clean), 1),
                    "other_p50_ms": _pct(other, 50) if other else None,
                    "other_cut_share": (sum(r["cut"]["other"] for r in rs) / len(other)
                                        if other else None),
                    "requests_per_s": sum(r["n"] for r in rs) / sum(r["wall"] for r in rs)}
    base = out.get("clean", {}).get("clean_p99_ms")
    for m in out.values():
        m["clean_p99_vs_clean_only"] = m["clean_p99_ms"] / base if base else None
    return out


def measure(ckpt: str, log: Path, env: dict, clean: list[str], adv: list[str], args,
            cap: int) -> dict:
    from deqguard.serving.launch import serve_subprocess

    runs = []
    with serve_subprocess(ckpt, log, **env) as url:
        asyncio.run(run_mix(url, clean, adv, "clean", 16, 0, 4, cap, 0))  # warm-up
        for rnd in range(args.rounds):  # interleaved, so that load drifts hit every mix alike
            for mix in MIXES:
                runs.append(asyncio.run(run_mix(url, clean, adv, mix, args.requests, args.share,
                                                args.concurrency, cap, args.seed + rnd)))
    return summarise(runs)


def print_table(name: str, env: dict, res: dict) -> None:
    print(f"\nserver {name} ({', '.join(f'{k}={v}' for k, v in env.items()) or 'defaults'})")
    print("| mix | clean p50 ms | clean p99 ms | clean p99 / clean-only | clean cut by budget "
          "| other p50 ms | other cut | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mix, m in res.items():
        other = "" if m["other_p50_ms"] is None else f"{m['other_p50_ms']:.0f}"
        ocut = "" if m["other_cut_share"] is None else f"{m['other_cut_share']:.0%}"
        print(f"| {mix} | {m['clean_p50_ms']:.0f} | {m['clean_p99_ms']:.0f} | "
              f"{m['clean_p99_vs_clean_only']:.2f}x | {m['clean_cut_share']:.1%} | {other} | "
              f"{ocut} | {m['requests_per_s']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--adv", help="npz from `deqguard eval --slowdown-save` (x_adv_uint8)")
    p.add_argument("--craft-n", type=int, default=32, help="without --adv: images to attack")
    p.add_argument("--craft-steps", type=int, default=50, help="without --adv: APGD steps")
    p.add_argument("--save", help="without --adv: folder for the crafted npz and PNGs")
    p.add_argument("--n", type=int, default=200, help="clean test images sent")
    p.add_argument("--requests", type=int, default=200, help="requests per mix and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--share", type=float, default=0.2, help="share of the other requests")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--attack-max-iter", type=int, default=100,
                   help="max_iter the other requests ask (lowered to the server's cap)")
    p.add_argument("--protected-cap", type=int,
                   help="DEQGUARD_MAX_ITER_CAP of the protected server (default: the "
                        "checkpoint's max_iter)")
    p.add_argument("--budget-ms", type=int,
                   help="DEQGUARD_REQUEST_BUDGET_MS of the protected server (default: twice "
                        "the open server's clean-only p99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--server-log", help="folder for the servers' logs (default: a temp dir)")
    args = p.parse_args(argv)

    import torch

    from deqguard.models import load_checkpoint, resolve_checkpoint

    torch.set_num_threads(1)
    ckpt = str(resolve_checkpoint(args.checkpoint))
    model, meta = load_checkpoint(ckpt, device="cpu")
    max_iter = model.config.solver.max_iter
    clean_png = _fashion_pngs(args.n)
    if clean_png is None:
        raise SystemExit("Fashion-MNIST test images not found")
    adv_png = attacked_pngs(args, ckpt)
    print(f"checkpoint {meta.name or ckpt}  solver {model.config.solver.solver}  max_iter "
          f"{max_iter}  tol {model.config.solver.tol}  clean images {len(clean_png)}  slowdown "
          f"images {len(adv_png)}  cpus {os.cpu_count()}  load {os.getloadavg()[0]:.2f}")
    in_process_check(ckpt, clean_png, adv_png, args.attack_max_iter)
    clean = [base64.b64encode(b).decode() for b in clean_png]
    adv = [base64.b64encode(b).decode() for b in adv_png]
    logs = Path(args.server_log or tempfile.mkdtemp(prefix="deqguard-slowdown-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    results = {}
    open_res = measure(ckpt, logs / "open.log", {}, clean, adv, args,
                       min(args.attack_max_iter, 100))
    results["open"] = {"env": {}, "mixes": open_res}
    print_table("open", {}, open_res)
    cap = args.protected_cap or max_iter
    budget = args.budget_ms or max(1, round(2 * open_res["clean"]["clean_p99_ms"]))
    env = {"DEQGUARD_MAX_ITER_CAP": str(cap), "DEQGUARD_REQUEST_BUDGET_MS": str(budget)}
    prot = measure(ckpt, logs / "protected.log", env, clean, adv, args,
                   min(args.attack_max_iter, cap))
    results["protected"] = {"env": env, "mixes": prot}
    print_table("protected", env, prot)
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
