"""Why Square breaks images that the exact-gradient attacks miss, and which white-box attack finds
them. Not a test: a study of one checkpoint, printed as one report.

    OMP_NUM_THREADS=1 .venv/bin/python bench/square_gap.py default --n 500 --out runs/square-gap

On the first --n test images of the checkpoint's dataset:
1. Square (pyautoattack, 5,000 queries, no gradient) on every correctly classified image; its
   adversarial points are cached in --out, keyed by the checkpoint's sha256.
2. APGD-CE then APGD-T (exact gradient through the solver, as `deqguard eval --attacks aa`) on
   the images Square broke. Those still correct after both are the gap: adversarial points exist
   within eps, and the white-box attacks did not reach them.
3. On the gap images:
   - whether Square's point is an adversarial of the equilibrium or of the solve: the prediction
     there with the served solve, a tight solve (tol 1e-6, 200 iterations) and the naive solver;
   - the served margin (true logit minus the largest other) along the segment from the clean
     image to Square's point: how often it changes sign and how rough it is;
   - whether the exact gradient is the derivative of the served function: its directional
     derivative along that segment against a central finite difference;
   - white-box variants (APGD-CE + APGD-T each): other seeds (fresh random starts), the implicit
     (IFT) gradient, the exact gradient through a fixed-depth solve (tol 0: every sample runs the
     full budget, no data-dependent stop), a margin (CW) loss;
   each variant's points are judged on the served solve.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from deqguard.evaluation.autoattack import run_autoattack
from deqguard.models import load_checkpoint
from deqguard.models.checkpoint import resolve_checkpoint
from deqguard.training.data import load_dataset


class Logits(nn.Module):
    """A DEQ's logits with a chosen gradient path and solve options (AutoAttack wraps this)."""

    def __init__(self, model: nn.Module, grad: str = "exact", **solve: object):
        super().__init__()
        self.model, self.grad, self.solve = model, grad, solve

    def forward(self, x: Tensor) -> Tensor:
        if not self.model.is_deq:
            return self.model(x)
        return self.model(x, grad=self.grad, **self.solve)


def served_logits(model: nn.Module, x: Tensor, batch: int = 250, **solve: object) -> Tensor:
    """What the service answers (no graph: each sample stops on its own), unless `solve`
    overrides the checkpoint's solver options. Every attack here is judged on this."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch], **solve) for i in range(0, len(x), batch)])


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """True-class logit minus the largest other: negative means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return true - other


def cached(path: Path, key: object, make: Callable[[], dict]) -> dict:
    """`make()`'s result, kept in `path` under `key` (what it was computed from: the checkpoint's
    sha256, and for the APGD stage also the images it attacked): Square alone costs about 20
    minutes on the default, and reruns of the diagnosis should not repeat it."""
    if path.exists():
        blob = torch.load(path)
        if blob.get("key") == key:
            return blob
    blob = make()
    blob["key"] = key
    torch.save(blob, path)
    return blob


def attack(module: nn.Module, model: nn.Module, x: Tensor, y: Tensor, eps: float, k: int,
           attacks: list[str], seed: int = 0) -> Tensor:
    """[N] bool: broken on the served solve by `attacks` run through `module`."""
    res = run_autoattack(module, x, y, eps=eps, num_classes=k, seed=seed, batch_size=250,
                         attacks=attacks)
    return served_logits(model, res.x_adv).argmax(1) != y


def print_table(rows: dict[str, list]) -> None:
    """One line per measurement, one column per image (the images are few)."""
    def cell(v: object) -> str:
        if isinstance(v, bool):
            return "x" if v else "."
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    width = max(len(k) for k in rows)
    for key, values in rows.items():
        print(f"{key:<{width}}  " + " ".join(f"{cell(v):>6}" for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default="default")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--out", default="runs/square-gap")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--diagnose", choices=("gap", "all"), default="gap",
                    help="step 3 on the gap, or on every image Square broke")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    path = resolve_checkpoint(args.checkpoint)
    model, meta = load_checkpoint(path, device="cpu")
    sha = meta.sha256 or path.name
    ds = load_dataset(args.data, "test", limit=args.n)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    k = model.config.num_classes
    print(f"checkpoint {path} ({model.config.arch}), first {len(x)} test images, eps {args.eps}")
    t0 = time.perf_counter()

    clean_ok = served_logits(model, x).argmax(1) == y

    def square() -> dict:
        res = run_autoattack(Logits(model), x, y, eps=args.eps, num_classes=k, batch_size=250,
                             attacks=["square"])
        return {"x_adv": res.x_adv, "broken": clean_ok & ~res.correct,
                "seconds": res.seconds.get("square", 0.0)}

    sq = cached(out / f"square-{args.n}.pt", sha, square)
    broken_sq = sq["broken"] & clean_ok
    print(f"clean {clean_ok.float().mean():.1%}; Square alone breaks {int(broken_sq.sum())} "
          f"({sq['seconds']:.0f} s when run)")
    idx = broken_sq.nonzero().flatten()

    def apgd() -> dict:
        return {"broken": attack(Logits(model), model, x[idx], y[idx], args.eps, k,
                                 ["apgd-ce", "apgd-t"])}

    wb = cached(out / f"apgd-on-square-{args.n}.pt", (sha, tuple(idx.tolist())), apgd)
    gap = idx[~wb["broken"]]
    print(f"of those, APGD-CE + APGD-T (exact gradient) break {int(wb['broken'].sum())}; "
          f"the gap: {len(gap)} images {gap.tolist()}")
    if args.diagnose == "all":  # every image Square broke, for contrast with the gap
        gap = idx
    if len(gap) == 0:
        return
    xg, yg, xs = x[gap], y[gap], sq["x_adv"][gap]
    report: dict = {"checkpoint": str(path), "n": len(x), "square_broken": int(broken_sq.sum()),
                    "apgd_also_broken": int(wb["broken"].sum()), "gap": gap.tolist()}

    rows: dict[str, list] = {"image": gap.tolist(),
                             "APGD-CE+T broke": wb["broken"][torch.searchsorted(idx, gap)].tolist()}
    if model.is_deq:
        with torch.no_grad():
            r = model.solve(xs, trajectory=False)
        rows["served wrong"] = (r.logits.argmax(1) != yg).tolist()
        rows["iterations"] = r.iterations.tolist()
        rows["converged"] = r.converged.tolist()
        rows["budget 60 wrong"] = (served_logits(model, xs, max_iter=60).argmax(1) != yg).tolist()
        rows["tight wrong"] = (served_logits(model, xs, tol=1e-6, max_iter=200).argmax(1)
                               != yg).tolist()
        rows["naive tight wrong"] = (served_logits(model, xs, solver="naive", tol=1e-6,
                                                   max_iter=200).argmax(1) != yg).tolist()

    ts = torch.linspace(0, 1, 41)
    path_m = torch.stack([margin(served_logits(model, xg + t * (xs - xg)), yg) for t in ts])
    rows["margin clean"] = path_m[0].tolist()
    rows["margin Square"] = path_m[-1].tolist()
    rows["sign changes"] = ((path_m[1:] > 0) != (path_m[:-1] > 0)).sum(0).tolist()
    rows["variation / net"] = ((path_m[1:] - path_m[:-1]).abs().sum(0)
                               / (path_m[-1] - path_m[0]).abs().clamp_min(1e-6)).tolist()

    if model.is_deq:
        d = xs - xg
        for grad in ("exact", "implicit"):
            for t in (0.0, 0.5):
                p = (xg + t * d).requires_grad_(True)
                g, = torch.autograd.grad(margin(Logits(model, grad)(p), yg).sum(), p)
                analytic = (g * d).flatten(1).sum(1)
                h = 1e-3
                fd = (margin(served_logits(model, xg + (t + h) * d), yg)
                      - margin(served_logits(model, xg + (t - h) * d), yg)) / (2 * h)
                rows[f"{grad} grad err t={t}"] = ((analytic - fd).abs()
                                                   / fd.abs().clamp_min(1e-3)).tolist()

    variants: dict[str, tuple[nn.Module, list[str], int]] = {
        "exact, seed 1": (Logits(model), ["apgd-ce", "apgd-t"], 1),
        "exact, seed 2": (Logits(model), ["apgd-ce", "apgd-t"], 2),
    }
    if model.is_deq:
        variants["implicit"] = (Logits(model, "implicit"), ["apgd-ce", "apgd-t"], 0)
        variants["exact, fixed depth"] = (Logits(model, tol=0.0), ["apgd-ce", "apgd-t"], 0)
    variants["exact, margin loss (apgd-dlr)"] = (Logits(model), ["apgd-dlr"], 0)
    if model.is_deq:
        variants["exact, budget 60"] = (Logits(model, max_iter=60), ["apgd-ce", "apgd-t"], 0)
    found = torch.zeros(len(gap), dtype=torch.bool)
    for name, (module, attacks, seed) in variants.items():
        t = time.perf_counter()
        try:
            b = attack(module, model, xg, yg, args.eps, k, attacks, seed)
        except Exception as exc:  # noqa: BLE001 - a study: report the variant that fails
            print(f"  {name}: failed: {exc}")
            continue
        found |= b
        rows[name] = b.tolist()
        print(f"  {name}: breaks {int(b.sum())} of {len(gap)} "
              f"({time.perf_counter() - t:.0f} s)")
    report["found_by_any_variant"] = int(found.sum())
    report["rows"] = rows
    print_table(rows)
    print(f"any white-box variant: {int(found.sum())} of {len(gap)}; "
          f"total {time.perf_counter() - t0:.0f} s")
    (out / f"report-{args.n}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
