"""Training throughput of a preset's objective on random data (images/s), CPU or CUDA.

Used for the GPU smoke of `cifar-large-trades-regulated` (issue 3): the paper's recipe, timed
without needing CIFAR-10 on the machine; for the cost of the training objectives on one
preset, printed as ratios to the first one measured in the same run (issue 10); and for what
bf16 autocast buys over fp32 (issue 21): each objective is timed in every `--precision`
(default fp32 and bf16) and the two rates are printed side by side with their ratio. On a CPU
without AMX-BF16 / AVX512-BF16 bf16 is still timed, emulated (as under DEQGUARD_CPU_BF16=force),
and labelled so; `deqguard train` would refuse train.amp=bf16 there.

    python bench/train_step.py --preset cifar-large-trades-regulated --steps 50 --device cuda
    python bench/train_step.py --preset fashion-tiny-regulated --channels 1 --size 28 \
        --compare pgd-at,fgsm-rs,n-fgsm --threads 2
    python bench/train_step.py --preset fashion-small-regulated --channels 1 --size 28 \
        --precision fp32,bf16 --channels-last --threads 2
    python bench/train_step.py --preset fashion-wk-regulated --channels 1 --size 28 \
        --batch-size 4 --precision fp32 --count-ops --threads 1 --sync-free off

`--sync-free` solves without reading the device back (models/solvers/base.py); `--count-ops`
also counts the read backs a step asks for. `--cuda-graphs` replays captured forwards
(training/graphs.py, train.cuda_graphs) and first checks one step against the eager sync-free
step from the same weights and draws: the loss and every gradient, printed as the largest
difference (0 where the replays compute the same bits).

    python bench/train_step.py --preset fashion-wk-regulated --channels 1 --size 28 \
        --batch-size 128 --precision fp32 --device cuda --sync-free on --cuda-graphs
"""

from __future__ import annotations

import argparse
import time

import torch

from deqguard.models import build_model
from deqguard.training.config import build_config
from deqguard.training.graphs import DepthGraphs
from deqguard.training.objectives import TrainForward, objective_loss
from deqguard.training.precision import NO_BF16, Precision, choose_precision, cpu_native_bf16

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar-large-trades-regulated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as for deqguard train")
    ap.add_argument("--compare", help="comma list of objective kinds to time in turn; "
                    "single-step kinds use their published step (fgsm-rs 1.25 eps, n-fgsm eps)")
    ap.add_argument("--precision", default=",".join(PRECISIONS), type=_precisions,
                    help="comma list of fp32, bf16 (default both): each objective is timed in "
                    "each; bf16 is autocast over fp32 weights, emulated on a CPU without "
                    "AMX-BF16 / AVX512-BF16")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and batch in channels_last memory format (train.channels_last)")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the operators one step dispatches (torch.profiler, top-level "
                         "aten ops, backward included): on a GPU each launches at least one "
                         "kernel, so ops x per-op overhead bounds a small model's step time")
    ap.add_argument("--sync-free", choices=("on", "off"), default="off",
                    help="solves without device read backs (default off, as deqguard train "
                         "without train.cuda_graphs)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay captured forwards (train.cuda_graphs; needs CUDA)")
    ap.add_argument("--max-diff", type=float, default=None,
                    help="with --cuda-graphs: exit with status 3 when the check's loss or a "
                         "gradient differs from the eager step by more than this (so that a "
                         "device command can decide whether to train with graphs)")
    args = ap.parse_args()
    if args.cuda_graphs and not args.device.startswith("cuda"):
        ap.error("--cuda-graphs needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        native = cpu_native_bf16()
        print(f"cpu native bf16: {'yes' if native else 'no'}"
              + ("" if native or "bf16" not in args.precision
                 else f" ({NO_BF16}): bf16 below is emulated"))
    precisions = {p: choose_precision("bf16" if p == "bf16" else "off", device.type,
                                      emulate=True) for p in args.precision}
    kinds = args.compare.split(",") if args.compare else [None]
    rates: dict[str, dict[str, float]] = {}
    for kind in kinds:
        extra = []
        if kind is not None:
            eps = build_config(args.preset, args.set).objective.eps
            step = {"fgsm-rs": 1.25 * eps, "n-fgsm": eps}.get(kind)
            extra = [f"objective.kind={kind}"] + ([f"objective.step_size={step}"] if step else [])
        cfg = build_config(args.preset, [*args.set, *extra])
        rates[cfg.objective.kind] = {p: images_per_second(args, cfg, prec)
                                     for p, prec in precisions.items()}
    first = next(iter(rates))
    if args.compare:
        for p, prec in precisions.items():
            for kind, rate in rates.items():
                print(f"{kind}: {rate[p]:.1f} images/s, {rate[p] / rates[first][p]:.2f}x {first}"
                      f" ({prec.label})")
    if len(precisions) == 2:
        for kind, rate in rates.items():
            print(f"{kind}: fp32 {rate['fp32']:.1f} images/s, {precisions['bf16'].label} "
                  f"{rate['bf16']:.1f} images/s, bf16/fp32 {rate['bf16'] / rate['fp32']:.2f}x")


def _precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(PRECISIONS)}")
    return names


# operators that copy a tensor's value to the host: on a GPU each waits for the queue
READ_BACKS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")


def count_ops(step) -> tuple[int, int]:
    """(operators, read backs) one call of `step` dispatches: aten ops not nested in another
    aten op (nested ones are a kernel's own business, and differ between CPU and GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(1 for n in top if n in READ_BACKS)


def compare_with_eager(cfg, model, graphed: TrainForward, x, y, amp: bool) -> float:
    """One loss and its gradients with the captured forwards, then eagerly (sync-free), from
    the same weights, depth draws and attack noise; prints and returns the largest difference
    (loss or any gradient element)."""
    results = []
    for graphs in (graphed.graphs, None):
        fwd = TrainForward(model, solver=graphed.solver, max_iter=graphed.max_iter,
                           tol=graphed.tol, grad=graphed.grad, readout=graphed.readout,
                           random_depth=graphed.random_depth, sync_free=True, graphs=graphs,
                           generator=torch.Generator().manual_seed(0))
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp,
                            cache_enabled=graphs is None):
            out = objective_loss(cfg.objective, fwd, x, y,
                                 noise=torch.Generator(device=x.device).manual_seed(1))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()
                                            if p.grad is not None], fwd.depths))
    model.zero_grad(set_to_none=True)
    (lg, gg, dg), (le, ge, de) = results
    assert dg == de, "the two steps drew different depths"
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(gg, ge, strict=True))
    loss_diff = float((lg - le).abs())
    print(f"cuda graphs vs eager (depths {dg}, {len(graphed.graphs)} captures): loss "
          f"{float(lg):.6f} vs {float(le):.6f}, |diff| {loss_diff:.3g}; "
          f"largest gradient |diff| {grad_diff:.3g} over {len(gg)} tensors")
    return max(loss_diff, grad_diff)


def images_per_second(args: argparse.Namespace, cfg, precision: Precision) -> float:
    """Images/s of `args.steps` training steps of `cfg`'s objective after `args.warmup` ones."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = args.batch_size or cfg.train.batch_size
    model = build_model(cfg.model.preset, num_classes=10, in_channels=args.channels,
                        image_size=args.size, **cfg.model.overrides).to(device).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    graphs = DepthGraphs(model) if args.cuda_graphs else None
    sync_free = args.sync_free == "on" or graphs is not None
    fwd = TrainForward(model, solver=cfg.solver.solver, max_iter=cfg.solver.max_iter,
                       tol=cfg.solver.tol, grad=cfg.grad, readout=cfg.objective.readout,
                       random_depth=cfg.regulation.enabled, sync_free=sync_free, graphs=graphs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    amp = precision.bf16
    x = torch.rand(batch, args.channels, args.size, args.size, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    if graphs is not None:
        worst = compare_with_eager(cfg, model, fwd, x, y, amp)
        if args.max_diff is not None and not worst <= args.max_diff:
            print(f"cuda graphs differ from eager by {worst:.3g} > --max-diff {args.max_diff}")
            raise SystemExit(3)

    def step() -> float:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp,
                            cache_enabled=graphs is None):
            out = objective_loss(cfg.objective, fwd, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    for _ in range(args.warmup):
        step()
    # captures out of the timed steps: warm up until 20 steps in a row capture nothing new
    quiet, seen = 0, -1
    while graphs is not None and quiet < 20:
        quiet, seen = (quiet + 1, seen) if len(graphs) == seen else (0, len(graphs))
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset={args.preset} device={name} params={params} batch={batch} "
          f"objective={cfg.objective.kind} steps={args.steps} "
          f"regulated={cfg.regulation.enabled} bf16={amp} precision={precision.label} "
          f"channels_last={args.channels_last} sync_free={sync_free} last_loss={loss:.3f}")
    print(f"train images/s: {args.steps * batch / dt:.1f} ({dt / args.steps * 1000:.0f} ms/step)"
          + ("" if graphs is None else f", {len(graphs)} captured forwards"))
    if args.count_ops:
        pairs = [count_ops(step) for _ in range(args.steps)]
        for what, counts in (("aten ops", [p[0] for p in pairs]),
                             ("read backs", [p[1] for p in pairs])):
            print(f"{what} per step (top level, {len(counts)} steps): min {min(counts)}, "
                  f"median {sorted(counts)[len(counts) // 2]}, max {max(counts)}")
    return args.steps * batch / dt


if __name__ == "__main__":
    main()
