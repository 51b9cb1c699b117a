"""Training throughput of a preset's objective on random data (images/s), CPU or CUDA.

Used for the GPU smoke of `cifar-large-trades-regulated` (issue 3): the paper's recipe, timed
without needing CIFAR-10 on the machine; and for the cost of the training objectives on one
preset, printed as ratios to the first one measured in the same run (issue 10):

    python bench/train_step.py --preset cifar-large-trades-regulated --steps 50 --device cuda
    python bench/train_step.py --preset fashion-tiny-regulated --channels 1 --size 28 \
        --compare pgd-at,fgsm-rs,n-fgsm --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from deqguard.models import build_model
from deqguard.training.config import build_config
from deqguard.training.objectives import TrainForward, objective_loss


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.compare:
        images_per_second(args, build_config(args.preset, args.set))
        return
    rates = {}
    for kind in args.compare.split(","):
        eps = build_config(args.preset, args.set).objective.eps
        step = {"fgsm-rs": 1.25 * eps, "n-fgsm": eps}.get(kind)
        extra = [f"objective.kind={kind}"] + ([f"objective.step_size={step}"] if step else [])
        rates[kind] = images_per_second(args, build_config(args.preset, [*args.set, *extra]))
    first = next(iter(rates))
    for kind, rate in rates.items():
        print(f"{kind}: {rate:.1f} images/s, {rate / rates[first]:.2f}x {first}")


def images_per_second(args: argparse.Namespace, cfg) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = args.batch_size or cfg.train.batch_size
    model = build_model(cfg.model.preset, num_classes=10, in_channels=args.channels,
                        image_size=args.size, **cfg.model.overrides).to(device).train()
    fwd = TrainForward(model, solver=cfg.solver.solver, max_iter=cfg.solver.max_iter,
                       tol=cfg.solver.tol, grad=cfg.grad, readout=cfg.objective.readout,
                       random_depth=cfg.regulation.enabled)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    amp = device.type == "cuda"
    x = torch.rand(batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> float:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = objective_loss(cfg.objective, fwd, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    for _ in range(args.warmup):
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
          f"regulated={cfg.regulation.enabled} bf16={amp} last_loss={loss:.3f}")
    print(f"train images/s: {args.steps * batch / dt:.1f} ({dt / args.steps * 1000:.0f} ms/step)")
    return args.steps * batch / dt


if __name__ == "__main__":
    main()
