"""How often the served `suspicious` flag fires on clean and on PGD-attacked test images, over HTTP.

The detector is fitted and calibrated in-process; what a user sees is the flag in the HTTP
answer at the server's default options. This sends the first `--n` Fashion-MNIST test images and
their PGD-`--steps` versions (crafted on the checkpoint with the project's attack through the
exact gradient, as `deqguard detect` crafts its sets by default, cached where
`deqguard detect evaluate` keeps its test set, `--cache/<sha256[:16]>/adv`, and reused) to a real
server and counts flags:

    .venv/bin/python bench/detect_http.py --checkpoint default --n 200 --cache runs/detect

Not a test: it prints rates measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

from deqguard.evaluation.advsets import CraftSpec, craft, split_images
from deqguard.evaluation.detector_cli import checkpoint_cache
from deqguard.models import load_checkpoint, resolve_checkpoint
from deqguard.serving.launch import serve_subprocess


def classify(url: str, x: np.ndarray, batch: int = 50) -> list[dict]:
    answers: list[dict] = []
    with httpx.Client(timeout=600) as http:
        for lo in range(0, len(x), batch):
            r = http.post(f"{url}/classify_tensor", json={"tensor": x[lo:lo + batch].tolist()})
            r.raise_for_status()
            answers += r.json()
    return answers


def rate(flags: np.ndarray) -> str:
    return f"{flags.mean():.1%} ({int(flags.sum())}/{flags.size})" if flags.size else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cache", default="runs/detect")
    ap.add_argument("--url", help="an already running server (default: start one here)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    x, y = split_images("test", 0, args.n)
    spec = CraftSpec("pgd", args.eps, args.steps, "test", 0, args.n)
    x_adv = craft(model, spec, x, y, checkpoint_cache(args.cache, meta.sha256) / "adv")
    if args.url:
        clean, attacked = classify(args.url, x.numpy()), classify(args.url, x_adv.numpy())
    else:
        log = Path(tempfile.mkdtemp()) / "server.log"
        with serve_subprocess(resolve_checkpoint(args.checkpoint), log) as url:
            clean, attacked = classify(url, x.numpy()), classify(url, x_adv.numpy())
    y_np = y.numpy()
    pred_c = np.array([a["label"] for a in clean])
    pred_a = np.array([a["label"] for a in attacked])
    flag_c = np.array([a["detection"]["suspicious"] for a in clean])
    flag_a = np.array([a["detection"]["suspicious"] for a in attacked])
    ok_c, fooled = pred_c == y_np, pred_a != y_np
    out = {
        "checkpoint": args.checkpoint, "n": args.n, "attack": spec.name,
        "detector": clean[0]["detection"]["detector"],
        "clean_accuracy": float(ok_c.mean()), "attacked_accuracy": float((~fooled).mean()),
        "flagged_clean": float(flag_c.mean()), "flagged_attacked": float(flag_a.mean()),
        "flagged_successful_attacks": float(flag_a[fooled].mean()) if fooled.any() else None,
        "successful_attacks": int(fooled.sum()),
    }
    print(f"detector: {out['detector']}; clean accuracy {ok_c.mean():.1%}, under "
          f"{spec.name} {(~fooled).mean():.1%}")
    print(f"suspicious on clean images: {rate(flag_c)}")
    print(f"suspicious on attacked images: {rate(flag_a)}")
    print(f"suspicious on successful attacks: {rate(flag_a[fooled])}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
