"""Cost of the detector's dynamics features next to the plain default solve (issue 11: <= 2x).

    OMP_NUM_THREADS=1 python bench/detect_cost.py --checkpoint default --n 100 --repeats 3

Times `model.solve(x)` (what a request with detect=false runs) and `model.solve(x,
features=cfg)` (detect=true with the checkpoint's learned detector, else the default
DynamicsConfig) on the first N Fashion-MNIST test images, best of `repeats`, and prints the
ratio plus the config's nominal extra cost in f evaluations.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deqguard.evaluation.advsets import split_images
from deqguard.models import load_checkpoint
from deqguard.models.dynamics import DynamicsConfig
from deqguard.models.learned_detector import detector_from_metadata


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint, "cpu")
    det = detector_from_metadata(meta)
    cfg = det.dynamics if det else DynamicsConfig()
    x, _ = split_images("test", 0, args.n)
    bs = args.batch_size

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                model.solve(x[i:i + bs])

    def featured() -> None:
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                model.solve(x[i:i + bs], features=cfg)

    plain()  # warm-up
    t_plain, t_feat = best_time(plain, args.repeats), best_time(featured, args.repeats)
    print(json.dumps({"checkpoint": args.checkpoint, "n": args.n, "batch_size": bs,
                      "threads": args.threads, "seconds_plain": t_plain,
                      "seconds_with_features": t_feat, "ratio": t_feat / t_plain,
                      "extra_f_evals_nominal": cfg.extra_f_evals(),
                      "dynamics": cfg.model_dump()}, indent=1))


if __name__ == "__main__":
    main()
