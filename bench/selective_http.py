"""Selective answers over HTTP: the share of clean test images answered at a requested coverage.

The thresholds are calibrated in-process on clean validation images (`deqguard eval
--calibrate-selective`); what a caller gets is the `abstained` flag of the HTTP answer. This sends
the first `--n` test images to a real server (started here on `--checkpoint`, or `--url`) with
each requested `--coverage` and reports, per coverage, the realised coverage (share not
abstained) with its binomial standard error, the accuracy among the answered and the accuracy
answering everything:

    .venv/bin/python bench/selective_http.py --checkpoint default --n 1000 --coverage 0.9

The targets at coverage 0.9: realised coverage within 0.03 of 0.9, and accuracy among the answered
at least the clean accuracy + 5 points. Not a test: it prints numbers measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np


def classify(url: str, x: np.ndarray, coverage: float, batch: int = 50) -> list[dict]:
    answers: list[dict] = []
    with httpx.Client(timeout=600) as http:
        for lo in range(0, len(x), batch):
            r = http.post(f"{url}/classify_tensor",
                          json={"tensor": x[lo:lo + batch].tolist(), "coverage": coverage})
            if r.status_code != 200:
                raise SystemExit(f"HTTP {r.status_code}: {r.text}")
            answers += r.json()
    return answers


def measure(url: str, x: np.ndarray, y: np.ndarray, coverage: float) -> dict:
    answers = classify(url, x, coverage)
    pred = np.array([a["label"] for a in answers])
    abstained = np.array([a["abstained"] for a in answers])
    answered = ~abstained
    ok = pred == y
    sel = answers[0].get("selective") or {}
    n = len(y)
    realised = float(answered.mean())
    return {"coverage": coverage, "n": n, "score": sel.get("score_name"),
            "threshold": sel.get("threshold"), "realised_coverage": realised,
            "realised_coverage_se": float(np.sqrt(realised * (1 - realised) / n)),
            "accuracy_answered": float(ok[answered].mean()) if answered.any() else None,
            "accuracy_all": float(ok.mean()), "answered": int(answered.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--url", help="an already running server (default: start one here)")
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "cifar10"])
    ap.add_argument("--data-dir")
    ap.add_argument("--n", type=int, default=1000, help="the first N test images")
    ap.add_argument("--coverage", default="0.9", help="comma list of coverages")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    import torch

    from deqguard.training.data import load_dataset

    ds = load_dataset(args.data, "test", data_dir=args.data_dir, limit=args.n)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).numpy()
    y = np.array([int(ds[i][1]) for i in range(len(ds))])
    coverages = [float(c) for c in args.coverage.split(",") if c.strip()]
    if args.url:
        out = [measure(args.url, x, y, c) for c in coverages]
    else:
        from deqguard.models import resolve_checkpoint
        from deqguard.serving.launch import serve_subprocess

        log = Path(tempfile.mkdtemp()) / "server.log"
        with serve_subprocess(resolve_checkpoint(args.checkpoint), log) as url:
            out = [measure(url, x, y, c) for c in coverages]
    for m in out:
        acc = m["accuracy_answered"]
        print(f"coverage {m['coverage']:g} ({m['score']}, threshold {m['threshold']}): "
              f"realised {m['realised_coverage']:.3f} +- {m['realised_coverage_se']:.3f} "
              f"({m['answered']}/{m['n']}), accuracy answered "
              f"{'n/a' if acc is None else f'{acc:.1%}'}, all {m['accuracy_all']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
