"""How many solver iterations the settled-exit saves, and what it costs in accuracy.

Not a test: it measures the shipped default (or --checkpoint) on the first --n Fashion-MNIST test
images, clean and attacked with the project's own PGD (deqguard.training.attacks.pgd_ce at the
checkpoint's validation settings), and prints one table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/anytime.py --n 300
    OMP_NUM_THREADS=1 .venv/bin/python bench/anytime.py --n 300 --grid   # choose the defaults

Each image is solved once at the checkpoint's default options with every state kept; the settled
exit (models/anytime.py: top-1 unchanged over the last k iterates and entropy under a threshold)
is then replayed on the decoded iterates. Replaying is exact: the solvers freeze a stopped sample,
so stopping at step t answers with z_t, the state the full solve passed through. The chosen
default is then also run through the real solve path to check the replay.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from deqguard.models import load_checkpoint
from deqguard.models.anytime import SettleRule
from deqguard.training.attacks import pgd_ce
from deqguard.training.data import load_dataset


def iterate_logits(model, x: torch.Tensor, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every iterate [T, B, K] (stopped samples repeat) and iterations [B]."""
    with torch.inference_mode():
        r = model.solve(x, trajectory=False, keep_states=True, **opts)
        logits = torch.stack([model.decode(z) for z in r.states])
    return logits.float().numpy(), r.iterations.numpy()


def replay(logits: np.ndarray, iters: np.ndarray, rule: SettleRule | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction [B], iterations [B]) when the settled exit is added to the solve."""
    top1 = logits.argmax(-1)  # [T, B]
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ent = -(np.where(p > 0, p * np.log(np.clip(p, 1e-300, None)), 0.0)).sum(-1)
    preds, used = [], []
    for i in range(logits.shape[1]):
        n = int(iters[i])
        stop = n
        if rule is not None:
            run = 0
            for t in range(n):
                run = run + 1 if t > 0 and top1[t, i] == top1[t - 1, i] else 1
                if run >= rule.k and ent[t, i] < rule.entropy:
                    stop = t + 1
                    break
        preds.append(top1[stop - 1, i])
        used.append(stop)
    return np.array(preds), np.array(used)


def summary(name: str, y: np.ndarray, full: tuple, settled: tuple) -> dict:
    (p0, i0), (p1, i1) = full, settled
    return {"inputs": name, "acc_full": float((p0 == y).mean()),
            "acc_settled": float((p1 == y).mean()), "mean_iter_full": float(i0.mean()),
            "mean_iter_settled": float(i1.mean()),
            "saved": float(1 - i1.sum() / i0.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--k", type=int, default=None, help="settle k (default: the serving default)")
    ap.add_argument("--entropy", type=float, default=None)
    ap.add_argument("--grid", action="store_true", help="print a grid of (k, entropy) choices")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deqguard.serving.options import DEFAULT_SETTLE_ENTROPY, DEFAULT_SETTLE_ITERS

    rule = SettleRule(args.k or DEFAULT_SETTLE_ITERS, args.entropy or DEFAULT_SETTLE_ENTROPY)
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    model.eval()
    ds = load_dataset("fashion-mnist", "test", limit=args.n)
    x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
    y = np.array([int(ds[i][1]) for i in range(len(ds))])
    pgd = meta.metrics.get("val_pgd") or {"eps": 0.1, "steps": 10, "step_size": 0.025}
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    x_adv = torch.cat([pgd_ce(model, x[i:i + 100], torch.as_tensor(y[i:i + 100]),
                              eps=pgd["eps"], step_size=pgd["step_size"], steps=pgd["steps"],
                              generator=g) for i in range(0, len(x), 100)])
    t_attack = time.perf_counter() - t0
    cfg = model.config.solver
    opts = {"solver": cfg.solver, "max_iter": cfg.max_iter, "tol": cfg.tol}
    runs = {name: iterate_logits(model, xs, opts) for name, xs in (("clean", x), ("pgd", x_adv))}
    if args.grid:
        print("k  entropy  clean_saved  clean_dacc  pgd_saved  pgd_dacc")
        for k in (1, 2, 3, 4, 5, 6, 8):
            for thr in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
                r = SettleRule(k, thr)
                row = []
                for name in ("clean", "pgd"):
                    s = summary(name, y, replay(*runs[name], None), replay(*runs[name], r))
                    row += [s["saved"], 100 * (s["acc_settled"] - s["acc_full"])]
                print(f"{k}  {thr:<7}  {row[0]:.3f}        {row[1]:+.2f}      {row[2]:.3f}"
                      f"      {row[3]:+.2f}")
    out = [summary(name, y, replay(*runs[name], None), replay(*runs[name], rule))
           for name in ("clean", "pgd")]
    # the real solve path with the rule, to check the replay
    with torch.inference_mode():
        for s, xs in zip(out, (x, x_adv), strict=True):
            r = model.solve(xs, trajectory=False, settle=rule, **opts)
            s["acc_settled_real"] = float((r.logits.argmax(-1).numpy() == y).mean())
            s["mean_iter_settled_real"] = float(r.iterations.float().mean())
    print(json.dumps({"checkpoint": meta.name, "n": len(y), "options": opts,
                      "settle": {"k": rule.k, "entropy": rule.entropy}, "pgd": pgd,
                      "attack_seconds": round(t_attack, 1), "results": out}, indent=2))


if __name__ == "__main__":
    main()
