"""The slowdown part of an evaluation: what an input crafted to stall the solver costs per answer.

For each attacked solver, the first `n` test images are attacked (slowdown.py) and then solved
one image at a time, clean and attacked interleaved, at the checkpoint's own budget (what a plain
request runs) and at the server's iteration cap (what a caller may ask for), with the
checkpoint's tol and the entropy trajectory decoded as the server does. One image per solve
keeps a sample's cost its own: in a batch, every sample pays for the slowest one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deqguard.models.classifier import DEQClassifier

from .slowdown import quantize_in_ball, residual_after, slowdown_attack
from .slowdown_schema import (
    SlowdownBudget,
    SlowdownResult,
    SlowdownSection,
    SlowdownSettings,
    SolveStats,
)
from .state import EvalState, mean

NOTE = ("one image per solve, clean and attacked interleaved (alternating which goes first), "
        "the entropy trajectory decoded as the server does, no settled exit; ms are wall time "
        "on the evaluation's device and comparable only within one run")


def default_k(model: DEQClassifier) -> int:
    """Half the checkpoint's max_iter: near where clean inputs meet tol. Much later (Anderson
    on the shipped default reaches relative residuals of 1e-7 by 25 iterations) the residual is
    rounding noise and its gradient leads nowhere."""
    return max(1, model.config.solver.max_iter // 2)


def slowdown(ev: EvalState) -> None:
    if ev.defended:
        ev.warn("the slowdown part attacks the plain solve; it was skipped under --defense")
        return
    if not ev.model.is_deq:
        ev.warn("the slowdown part needs a DEQ checkpoint (a feed-forward model has no solver "
                "to stall); skipped")
        return
    model = ev.model
    assert isinstance(model, DEQClassifier)
    s = ev.s.slowdown or SlowdownSettings()
    cfg = model.config.solver
    k = s.k or default_k(model)
    n = min(s.n or len(ev.x), len(ev.x))
    x, y = ev.x[:n], ev.y[:n]
    budgets = sorted({cfg.max_iter, s.cap})
    results = []
    for solver in s.solvers or [cfg.solver]:
        key = {"sha256": ev.ckpt.sha256, "solver": solver, "eps": ev.s.eps, "k": k,
               "steps": s.steps, "restarts": s.restarts, "seed": ev.s.seed}
        generator = ev.generator()  # drawn either way: a resumed run keeps the later seeds
        saved = load_attacked(Path(s.save), key, x) if s.save else None
        if saved is not None:
            _log(ev, f"slowdown: {solver} attacked images read from {s.save}")
            x_adv, seconds = saved
        else:
            _log(ev, f"slowdown: attacking {solver} (k={k}, {s.steps} steps) on {n} images")
            t0 = time.perf_counter()
            x_adv, _ = slowdown_attack(model, x, eps=ev.s.eps, k=k, steps=s.steps,
                                       solver=solver, restarts=s.restarts,
                                       batch_size=ev.s.batch_size, generator=generator)
            seconds = time.perf_counter() - t0
            if s.save:
                save_attacked(Path(s.save), solver, x, x_adv, y, eps=ev.s.eps, k=k,
                              key=key, seconds=seconds)
        r_clean = _residuals(model, x, k, solver, ev.s.batch_size)
        r_adv = _residuals(model, x_adv, k, solver, ev.s.batch_size)
        rows = []
        for b in budgets:
            _log(ev, f"slowdown: timing {solver} at max_iter {b}")
            rows.append(measure_budget(model, x, x_adv, y, solver=solver, max_iter=b,
                                       is_default=b == cfg.max_iter))
        results.append(SlowdownResult(
            solver=solver, k=k, steps=s.steps, restarts=s.restarts, eps=ev.s.eps, n=n,
            residual_clean_median=float(r_clean.median()),
            residual_attacked_median=float(r_adv.median()),
            residual_raised_fraction=mean(r_adv > r_clean), seconds=seconds,
            resumed=saved is not None, budgets=rows))
    ev.report.slowdown = SlowdownSection(tol=cfg.tol, default_max_iter=cfg.max_iter,
                                         results=results, note=NOTE)


def _log(ev: EvalState, msg: str) -> None:
    if ev.progress:
        print(msg, file=sys.stderr, flush=True)


def _residuals(model: DEQClassifier, x: Tensor, k: int, solver: str, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([residual_after(model, x[i:i + batch_size], k, solver)
                          for i in range(0, len(x), batch_size)])


def measure_budget(model: DEQClassifier, x: Tensor, x_adv: Tensor, y: Tensor, *, solver: str,
                   max_iter: int, is_default: bool) -> SlowdownBudget:
    """Clean against attacked at one budget, one image per solve, timed interleaved."""
    sets = {"clean": x, "attacked": x_adv}
    its: dict[str, list[int]] = {k: [] for k in sets}
    conv: dict[str, list[bool]] = {k: [] for k in sets}
    right: dict[str, list[bool]] = {k: [] for k in sets}
    secs: dict[str, float] = {k: 0.0 for k in sets}

    def solve(xb: Tensor):
        return model.solve(xb, solver=solver, max_iter=max_iter, trajectory=True)

    with torch.no_grad():
        solve(x[:1])  # warm-up
        for i in range(len(x)):
            order = ("clean", "attacked") if i % 2 == 0 else ("attacked", "clean")
            for name in order:
                xb = sets[name][i:i + 1]
                _sync(xb.device)
                t0 = time.perf_counter()
                r = solve(xb)
                _sync(xb.device)
                secs[name] += time.perf_counter() - t0
                its[name].append(int(r.iterations[0]))
                conv[name].append(bool(r.converged[0]))
                right[name].append(bool(r.logits.argmax(1)[0] == y[i]))
    stats = {name: _stats(its[name], conv[name], right[name], secs[name]) for name in sets}
    clean, attacked = stats["clean"], stats["attacked"]
    return SlowdownBudget(
        max_iter=max_iter, is_default=is_default, clean=clean, attacked=attacked,
        ms_ratio=attacked.ms_per_answer / clean.ms_per_answer if clean.ms_per_answer else 1.0,
        iterations_ratio=(attacked.mean_iterations / clean.mean_iterations
                          if clean.mean_iterations else 1.0))


def _stats(its: list[int], conv: list[bool], right: list[bool], seconds: float) -> SolveStats:
    a = np.asarray(its, dtype=float)
    return SolveStats(mean_iterations=float(a.mean()), p90_iterations=float(np.percentile(a, 90)),
                      max_iterations=int(a.max()), converged_fraction=float(np.mean(conv)),
                      ms_per_answer=1000.0 * seconds / len(its), accuracy=float(np.mean(right)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_attacked(folder: Path, solver: str, x: Tensor, x_adv: Tensor, y: Tensor, *, eps: float,
                  k: int, key: dict | None = None, seconds: float = 0.0) -> Path:
    """folder/slowdown-SOLVER.npz (float inputs, their 8-bit versions, labels, and `key`: what
    made them, so a rerun with the same settings reads them instead of attacking again) and
    folder/slowdown-SOLVER/NNNN.png: what an HTTP client sends (bench/slowdown_http.py)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    q = quantize_in_ball(x_adv, x, eps).cpu().numpy()
    path = folder / f"slowdown-{solver}.npz"
    np.savez_compressed(path, x=x.cpu().numpy(), x_adv=x_adv.cpu().numpy(), x_adv_uint8=q,
                        y=y.cpu().numpy(), eps=eps, k=k, solver=solver,
                        key=json.dumps(key or {}, sort_keys=True), seconds=seconds)
    pngs = folder / f"slowdown-{solver}"
    pngs.mkdir(exist_ok=True)
    for i, img in enumerate(q):
        arr = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        Image.fromarray(arr).save(pngs / f"{i:04d}.png")
    return path


def load_attacked(folder: Path, key: dict, x: Tensor) -> tuple[Tensor, float] | None:
    """(x_adv, crafting seconds) saved by an earlier run with the same `key` on the same images,
    else None (nothing saved, other settings, other images)."""
    path = folder / f"slowdown-{key['solver']}.npz"
    if not path.exists():
        return None
    with np.load(path) as saved:
        if "key" not in saved or json.loads(str(saved["key"])) != json.loads(
                json.dumps(key, sort_keys=True)):
            return None
        if saved["x"].shape != tuple(x.shape) or not np.array_equal(saved["x"],
                                                                    x.cpu().numpy()):
            return None
        return torch.from_numpy(saved["x_adv"]).to(x.device), float(saved["seconds"])


def markdown(section: SlowdownSection) -> list[str]:
    """The report.md table: clean against attacked per solver and budget."""
    lines = ["## Slowdown attacks", "",
             f"Inputs within eps that raise the relative residual after k iterations (exact "
             f"gradient through the solver, APGD); tol {section.tol:g}. Measured {section.note}.",
             "", "| solver | max_iter | mean it. clean / attacked | p90 | max | converged | "
             "ms per answer | ms ratio | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in section.results:
        for b in r.budgets:
            c, a = b.clean, b.attacked
            tag = " (default)" if b.is_default else ""
            lines.append(
                f"| {r.solver} (k={r.k}) | {b.max_iter}{tag} | {c.mean_iterations:.1f} / "
                f"{a.mean_iterations:.1f} | {c.p90_iterations:.0f} / {a.p90_iterations:.0f} | "
                f"{c.max_iterations} / {a.max_iterations} | {c.converged_fraction:.1%} / "
                f"{a.converged_fraction:.1%} | {c.ms_per_answer:.1f} / {a.ms_per_answer:.1f} | "
                f"{b.ms_ratio:.2f}x | {c.accuracy:.1%} / {a.accuracy:.1%} |")
    lines.append("")
    return lines
