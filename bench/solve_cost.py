"""What one solve costs at small batches: the fast solve path against the reference one. Not a test.

Part 1 times, interleaved over `--rounds` rounds (median and min-max printed, ms per image):
- `solve`: `model.solve` at the checkpoint's served options (solver, max_iter, tol, trajectory
  on), on the reference path (`reference=True`: module calls, every sample evaluated every
  step, a decode per step; what every solve ran before the fast path) and on the fast path;
- `solve+features`: the same plus the learned detector's dynamics features (what a default
  request with detection computes);
- `engine`: the in-process serving engine (`TorchEngine.classify`, served default options, a
  lone image run as a pair as served), with `model.solve` pinned to either path, and the same
  engine serving the anchor CNN (`--anchor`) for the default-to-CNN ratio.
The fast path's answers are checked against the reference's on the same images first (largest
logit and entropy difference, labels, iteration counts).

`--profile`: cProfile of `model.solve` per batch and path, time per component of a solve.

`--op-profile`: torch.profiler (record_shapes) of the served default answer at batch 1 (the
engine, detection on, fast path): CPU time per component of the answer (the components are
wrapped in `record_function` for the run only) and the top aten ops by self time with their
shapes, per answer. Process CPU time (`time.process_time`) is printed beside wall time: on a
shared machine wall time also counts the time other processes held the core.

Part 2 (`--accuracy N`): every solver at the served budget and tolerance on the first N test
images: accuracy, converged share, mean iterations; and ms per image at batch 1 and 32 (fast
path, interleaved rounds).

    OMP_NUM_THREADS=1 .venv/bin/python bench/solve_cost.py --checkpoint default \\
        --anchor runs/long/fashion-cnn-wk/best.safetensors --accuracy 1000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from deqguard.evaluation.advsets import split_images
from deqguard.models import load_checkpoint

PATHS = ("reference", "fast")
SOLVERS = ("naive", "anderson", "broyden")


@contextlib.contextmanager
def _pinned(model, path: str | None) -> Iterator[None]:
    """Every solve of `model` inside (the detector's restart re-solve included) on one path."""
    if path is None or not getattr(model, "is_deq", False):
        yield
        return
    ref = path == "reference"
    cls = type(model)
    model.solve = functools.partial(cls.solve, model, reference=ref)
    model.equilibrium = functools.partial(cls.equilibrium, model, reference=ref)
    try:
        yield
    finally:
        del model.solve, model.equilibrium


def _served(model) -> dict:
    cfg = model.config.solver
    return {"solver": cfg.solver, "max_iter": cfg.max_iter, "tol": cfg.tol}


# wall time by default; `--clock cpu`: this process's CPU time, which on a shared machine leaves
# out the time other processes held the core
_CLOCK = {"fn": time.perf_counter}


def _time_per_image(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch: int) -> float:
    """ms per image over all of x in batches of `batch`."""
    clock = _CLOCK["fn"]
    t0 = clock()
    for i in range(0, len(x), batch):
        fn(x[i:i + batch])
    return 1000.0 * (clock() - t0) / len(x)


def _rounds(rows: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Every row once per round, in the same order: ratios within a round share the load."""
    out: dict[str, list[float]] = {k: [] for k in rows}
    for fn in rows.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in rows.items():
            out[name].append(fn())
    return out


def _summary(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def _ratio(a: list[float], b: list[float], fmt: str = "{:.2f}x") -> str:
    """Median (min-max) of a[i] / b[i]: rows timed in the same round share that round's load."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return f"{fmt.format(statistics.median(r))} ({fmt.format(min(r))}-{fmt.format(max(r))})"


def check_answers(model, x: torch.Tensor, opts: dict, batches: list[int]) -> None:
    print("\nFast path vs reference path on the same images (served options, trajectory on):")
    print("| batch | max logit diff | max entropy diff | max residual diff | labels | iterations |")
    print("|---:|---:|---:|---:|---|---|")
    with torch.inference_mode():
        for b in batches:
            xs = x[:max(b, 2 * b)]
            refs = [model.solve(xs[i:i + b], trajectory=True, reference=True, **opts)
                    for i in range(0, len(xs), b)]
            fasts = [model.solve(xs[i:i + b], trajectory=True, **opts)
                     for i in range(0, len(xs), b)]
            pairs = list(zip(refs, fasts, strict=True))
            dl = max((r.logits - f.logits).abs().max().item() for r, f in pairs)
            de = max((r.entropy - f.entropy).abs().max().item() for r, f in pairs)
            dr = max((r.residual - f.residual).abs().max().item() for r, f in pairs)
            same_y = all(torch.equal(r.logits.argmax(-1), f.logits.argmax(-1)) for r, f in pairs)
            same_it = all(torch.equal(r.iterations, f.iterations) for r, f in pairs)
            print(f"| {b} | {dl:.1e} | {de:.1e} | {dr:.1e} | "
                  f"{'same' if same_y else 'DIFFER'} | {'same' if same_it else 'DIFFER'} |")


def part1(model, x: torch.Tensor, args) -> None:
    from deqguard.serving.torch_engine import TorchEngine

    opts = _served(model)
    engine = TorchEngine.load(args.checkpoint, device="cpu", threads=args.threads)
    served = engine.resolve()
    features = engine.detector.learned.dynamics if engine.wants_features(served) else None
    anchor = TorchEngine.load(args.anchor, device="cpu", threads=args.threads) \
        if args.anchor else None
    print(f"served options {served}; detector features: {features is not None}")
    check_answers(model, x, opts, args.batches)
    xn = x.numpy()

    def solve_row(path: str, feats, b: int) -> Callable[[], float]:
        def run(xb: torch.Tensor) -> object:
            with _pinned(model, path), torch.inference_mode():
                return model.solve(xb, trajectory=True, features=feats, **opts)
        return lambda: _time_per_image(run, x, b)

    def engine_row(eng, path: str | None, b: int) -> Callable[[], float]:
        def run(xb: torch.Tensor) -> object:
            with _pinned(eng.model, path):
                return eng.classify(xb.numpy(), eng.resolve())
        return lambda: _time_per_image(run, torch.from_numpy(xn), b)

    for b in args.batches:
        rows: dict[str, Callable[[], float]] = {}
        for kind in ("solve", "solve+features", "engine default"):  # each pair back to back
            if kind == "solve+features" and features is None:
                continue
            for path in PATHS:
                name = f"{kind}, {path}"
                if kind == "engine default":
                    rows[name] = engine_row(engine, path, b)
                else:
                    rows[name] = solve_row(path, features if kind != "solve" else None, b)
        if anchor is not None:
            rows["engine anchor CNN"] = engine_row(anchor, None, b)
        res = _rounds(rows, args.rounds)
        print(f"\n## batch {b}: ms per image over {len(x)} images, median (min-max) of "
              f"{args.rounds} interleaved rounds; ratios: median (min-max) of the per-round "
              "ratios")
        print("| row | ms/image | fast / reference | / anchor CNN engine |")
        print("|---|---:|---:|---:|")
        cnn = res.get("engine anchor CNN")
        for name, times in res.items():
            vs_ref = vs_cnn = "-"
            if name.endswith(", fast"):
                ref = res[name.replace(", fast", ", reference")]
                vs_ref = _ratio(times, ref)
            if cnn is not None and name != "engine anchor CNN":
                vs_cnn = _ratio(times, cnn, "{:.1f}x")
            print(f"| {name} | {_summary(times)} | {vs_ref} | {vs_cnn} |")


# (file suffix, function) -> component of a solve's time, by cumulative time under cProfile
_COMPONENTS = {
    ("models/layers.py", "forward"): "f: the cell (module calls)",
    ("models/layers.py", "step"): "f: the cell (bound)",
    ("solvers/anderson.py", "_mixing_weights"): "Anderson: mixing weights",
    ("solvers/anderson.py", "mixing_weights"): "Anderson: mixing weights",
    ("solvers/anderson.py", "push"): "Anderson: history and Gram row",
    ("solvers/anderson.py", "mix"): "Anderson: mix",
    ("solvers/base.py", "check"): "recorder: residual and stop checks",
    ("solvers/base.py", "commit"): "recorder: masked update (+ hook)",
    ("solvers/base.py", "finished"): "recorder: any left (host sync)",
    ("models/anytime.py", "on_iterate"): "trajectory: per-step hook (decode or keep)",
    ("models/anytime.py", "_decode_all"): "trajectory: one decode after the loop",
}


def profile_solves(model, x: torch.Tensor, args) -> None:
    """cProfile of `model.solve` at the served options, per batch and path: where time goes."""
    import cProfile
    import pstats

    opts = _served(model)
    for b in args.batches:
        print(f"\n### where a solve's time goes at batch {b} (cProfile, cumulative ms per solve; "
              "the profiler itself inflates Python-heavy rows)")
        table: dict[str, dict[str, float]] = {}
        totals = {}
        xb, reps = x[:b], max(1, 128 // b)
        profs = {path: cProfile.Profile() for path in PATHS}
        with torch.inference_mode():
            for path in PATHS:
                model.solve(xb, trajectory=True, reference=path == "reference", **opts)
            for _ in range(reps):  # alternating, so both paths see the same load
                for path in PATHS:
                    profs[path].enable()
                    model.solve(xb, trajectory=True, reference=path == "reference", **opts)
                    profs[path].disable()
        for path in PATHS:
            raw = pstats.Stats(profs[path]).stats  # type: ignore[attr-defined]
            totals[path] = 1000 * sum(v[2] for v in raw.values()) / reps
            for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
                for (suffix, name), label in _COMPONENTS.items():
                    if file.endswith(suffix) and func == name:
                        row = table.setdefault(label, {})
                        row[path] = row.get(path, 0.0) + 1000 * ct / reps
            hook = table.get("trajectory: per-step hook (decode or keep)", {}).get(path, 0.0)
            commit = table.get("recorder: masked update (+ hook)", {})
            if path in commit:
                commit[path] -= hook
        print("| component | " + " | ".join(f"{p} ms" for p in PATHS) + " |")
        print("|---|" + "---:|" * len(PATHS))
        for label in dict.fromkeys(_COMPONENTS.values()):
            if label in table:
                cells = " | ".join(f"{table[label].get(p, 0.0):.2f}" for p in PATHS)
                print(f"| {label} | {cells} |")
        print("| whole solve | " + " | ".join(f"{totals[p]:.2f}" for p in PATHS) + " |")


# (module, owner, attribute) wrapped in a record_function label for --op-profile
_OP_COMPONENTS = (
    ("deqguard.models.solvers.base", "StepRecorder", "evaluate", "solve: f (the cell)"),
    ("deqguard.models.solvers.base", "StepRecorder", "check", "solve: residual and stop check"),
    ("deqguard.models.solvers.base", "StepRecorder", "commit", "solve: masked update"),
    ("deqguard.models.solvers.base", "StepRecorder", "output", "solve: output"),
    ("deqguard.models.solvers.anderson", "_RingHistory", "push", "Anderson: history push"),
    ("deqguard.models.solvers.anderson", "_RingHistory", "mixing_weights",
     "Anderson: mixing weights"),
    ("deqguard.models.solvers.anderson", None, "_mixing_weights", "Anderson: mixing weights"),
    ("deqguard.models.solvers.anderson", "_RingHistory", "mix", "Anderson: mix"),
    ("deqguard.models.anytime", "IterateWatcher", "_decode_all", "trajectory: decode after loop"),
    ("deqguard.models.classifier", "DEQClassifier", "equilibrium", "solve (whole equilibrium)"),
    ("deqguard.models.dynamics", None, "_entropy_step_drop", "detector: entropy-step feature"),
    ("deqguard.models.dynamics", None, "dynamics_features", "detector: all features"),
    ("deqguard.serving.engine", "ModelEngine", "trace", "engine: trace (solve + features)"),
    ("deqguard.serving.engine", "ModelEngine", "classify", "engine: whole answer"),
)


@contextlib.contextmanager
def _labelled(clock: dict[str, list[float]] | None = None) -> Iterator[None]:
    """Every _OP_COMPONENTS function runs inside a record_function of its label; with `clock`,
    instead, its thread CPU time and calls add up in clock[label] ([seconds, calls])."""
    import importlib

    undo = []
    for mod_name, owner_name, attr, label in _OP_COMPONENTS:
        mod = importlib.import_module(mod_name)
        owner = mod if owner_name is None else getattr(mod, owner_name)
        orig = getattr(owner, attr, None)
        if orig is None:  # not in this version of the code
            continue

        if clock is None:
            def wrapped(*a, _orig=orig, _label=label, **k):
                with torch.profiler.record_function(_label):
                    return _orig(*a, **k)
        else:
            acc = clock.setdefault(label, [0.0, 0])

            def wrapped(*a, _orig=orig, _acc=acc, **k):
                t0 = time.thread_time()
                try:
                    return _orig(*a, **k)
                finally:
                    _acc[0] += time.thread_time() - t0
                    _acc[1] += 1

        setattr(owner, attr, wrapped)
        undo.append((owner, attr, orig))  # module functions are looked up at call time
    try:
        yield
    finally:
        for owner, attr, orig in reversed(undo):
            setattr(owner, attr, orig)


def op_profile(args) -> None:
    """Where one served default answer at batch 1 spends its time (engine, detection on)."""
    from torch.profiler import ProfilerActivity, profile

    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(args.checkpoint, device="cpu", threads=args.threads)
    opts = engine.resolve()
    x, _ = split_images("test", 0, args.images)
    xn = x.numpy()
    n = len(xn)
    for i in range(min(4, n)):
        engine.classify(xn[i:i + 1], opts)
    with torch.inference_mode():
        its = engine.model.solve(x, trajectory=True, **_served(engine.model)).iterations
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        engine.classify(xn[i:i + 1], opts)
    wall, cpu = (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3
    print(f"\n## op profile: the served default answer at batch 1 ({n} images, one at a time; "
          f"mean solver iterations {its.float().mean():.2f})")
    print(f"unprofiled: {wall:.2f} ms wall, {cpu:.2f} ms process CPU per answer")
    clock: dict[str, list[float]] = {}
    with _labelled(clock):
        for i in range(n):
            engine.classify(xn[i:i + 1], opts)
    whole_cpu = clock["engine: whole answer"][0] / n * 1e3
    print("\nComponents by thread CPU time (not profiled, a timer around each; ms per answer; "
          "nested rows are included in their parents):")
    print("| component | CPU ms/answer | calls/answer | share of the answer |")
    print("|---|---:|---:|---:|")
    for label in dict.fromkeys(c[3] for c in _OP_COMPONENTS):
        if label in clock:
            ms, calls = clock[label][0] / n * 1e3, clock[label][1] / n
            print(f"| {label} | {ms:.2f} | {calls:.1f} | {100 * ms / whole_cpu:.0f}% |")
    with _labelled(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(n):
            engine.classify(xn[i:i + 1], opts)
    events = prof.key_averages()
    labels = list(dict.fromkeys(c[3] for c in _OP_COMPONENTS))
    per = {e.key: e for e in events}
    whole = per["engine: whole answer"].cpu_time_total / n / 1e3
    print("\nUnder torch.profiler (wall time of each region incl. children, inflated by the "
          "profiler and by other processes; ms per answer):")
    print("| component | ms/answer | calls/answer | share of the answer |")
    print("|---|---:|---:|---:|")
    for label in labels:
        e = per.get(label)
        if e is None:
            continue
        ms = e.cpu_time_total / n / 1e3
        print(f"| {label} | {ms:.2f} | {e.count / n:.1f} | {100 * ms / whole:.0f}% |")
    print("\nTop aten ops by self CPU time (ms per answer), by input shape:")
    print("| op | input shapes | self ms/answer | calls/answer | us/call |")
    print("|---|---|---:|---:|---:|")
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key.startswith("aten::")]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in rows[:args.op_rows]:
        shapes = str(e.input_shapes)[:70].replace("|", "/")
        print(f"| {e.key} | {shapes} | {e.self_cpu_time_total / n / 1e3:.3f} | "
              f"{e.count / n:.1f} | {e.self_cpu_time_total / e.count:.1f} |")
    kinds: dict[str, list[float]] = {}
    for e in events:
        if e.key.startswith("aten::"):
            k = kinds.setdefault(e.key, [0.0, 0.0])
            k[0] += e.self_cpu_time_total
            k[1] += e.count
    aten = sum(v[0] for v in kinds.values()) / n / 1e3
    calls = sum(v[1] for v in kinds.values()) / n
    print(f"\naten self time {aten:.2f} ms/answer over {calls:.0f} aten calls/answer; the rest "
          f"of the {whole:.2f} ms is Python and dispatch between them")


def part2(model, args) -> None:
    n = args.accuracy
    x, y = split_images("test", 0, n)
    opts = _served(model)
    print(f"\n## solvers at the served budget (max_iter {opts['max_iter']}, tol {opts['tol']}), "
          f"first {n} test images, fast path")
    stats = {}
    with torch.inference_mode():
        for s in SOLVERS:
            rs = [model.solve(x[i:i + 32], trajectory=True, **{**opts, "solver": s})
                  for i in range(0, n, 32)]
            logits = torch.cat([r.logits for r in rs])
            stats[s] = ((logits.argmax(-1) == y).float().mean().item(),
                        torch.cat([r.converged for r in rs]).float().mean().item(),
                        torch.cat([r.iterations for r in rs]).float().mean().item())
    xt = x[:args.timing_images]
    rows = {}
    for s in SOLVERS:
        for b in args.batches:
            def run(xb: torch.Tensor, s: str = s) -> object:
                with torch.inference_mode():
                    return model.solve(xb, trajectory=True, **{**opts, "solver": s})
            rows[(s, b)] = functools.partial(_time_per_image, run, xt, b)
    res = _rounds(rows, args.rounds)
    heads = " | ".join(f"ms/image at batch {b} | / anderson" for b in args.batches)
    print(f"| solver | accuracy | converged | mean iterations | {heads} |")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(args.batches))
    for s in SOLVERS:
        acc, conv, iters = stats[s]
        cells = " | ".join(f"{_summary(res[(s, b)])} | {_ratio(res[(s, b)], res[('anderson', b)])}"
                           for b in args.batches)
        print(f"| {s} | {100 * acc:.1f}% | {100 * conv:.1f}% | {iters:.2f} | {cells} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--anchor", help="a feed-forward checkpoint served alongside for the ratio")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--images", type=int, default=64, help="images per timed row and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--accuracy", type=int, default=0,
                   help="part 2 on the first N test images (0: skip)")
    p.add_argument("--timing-images", type=int, default=64, help="part 2: images per timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="also profile model.solve (cProfile): time per component, both paths")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the timed rows measure: wall time, or this process's CPU time")
    p.add_argument("--op-profile", action="store_true",
                   help="only profile the served default answer at batch 1 (torch.profiler)")
    p.add_argument("--op-rows", type=int, default=25, help="--op-profile: aten rows shown")
    args = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    torch.set_num_threads(args.threads)
    _CLOCK["fn"] = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.op_profile:
        op_profile(args)
        return
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    model.eval()
    print(f"# bench/solve_cost.py: torch {torch.__version__}, {args.threads} thread(s), CPU; "
          f"checkpoint {meta.name or args.checkpoint}; clock: {args.clock}")
    x, _ = split_images("test", 0, args.images)
    part1(model, x, args)
    if args.profile:
        profile_solves(model, x, args)
    if args.accuracy:
        part2(model, args)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
