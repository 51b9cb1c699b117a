"""Benchmark (not a test): `deqguard score` throughput vs the model alone on the same tensors.

Writes a folder of PNGs, decodes them once into tensors, then times
  (a) the model alone: `model.solve` over those tensors in batches (no files, no rows), and
  (b) batch scoring: `deqguard score` (local engine: decoding workers, model, rows, output),
and prints images/s of each and their ratio (target >= 0.9x). The scoring loop is timed as the
command's progress bar measures it (model loading excluded); the whole command's wall time,
model loading and output assembly included, is printed too. Each side runs `--repeats` times
interleaved and the best run counts, since other processes on the machine add noise.

    .venv/bin/python bench/score.py --n 3000 [--checkpoint PATH] [--batch-size 64]

Without --checkpoint a randomly initialised tiny DEQ is used; solves then run the same options
on both sides, so the work per image is identical.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def write_pngs(root: Path, n: int, size: int, channels: int, seed: int = 0) -> None:
    """Noisy images with a bright square in one quadrant, in 4 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(rng.integers(0, 4))
        img = rng.uniform(0, 0.3, (size, size, channels))
        r, c, h = k // 2, k % 2, size // 2
        img[r * h + 2: r * h + h - 2, c * h + 2: c * h + h - 2] += 0.6
        pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        d = root / f"shape{k}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buf, format="PNG")
        (d / f"{i:06d}.png").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default auto)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for the model on both sides (default 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
    args = ap.parse_args()

    import torch

    from deqguard.clients.files import find_images
    from deqguard.clients.local import default_workers
    from deqguard.clients.score import ScoreConfig, score_folder
    from deqguard.models import build_model, load_checkpoint, save_checkpoint
    from deqguard.serving.images import decode_image

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="deqguard-bench-score-"))
    ckpt = args.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = str(work / "tiny.safetensors")
        save_checkpoint(build_model("tiny", num_classes=4), ckpt,
                        {"name": "bench-tiny-random", "classes": [f"shape{i}" for i in range(4)]})
    model, meta = load_checkpoint(ckpt)
    spec = meta.input
    images = work / "images"
    write_pngs(images, args.n, spec.height, spec.channels)
    files = find_images(images)
    x = torch.from_numpy(np.stack([
        decode_image((images / f).read_bytes(), channels=spec.channels, height=spec.height,
                     width=spec.width) for f in files]))
    device = next(model.parameters()).device
    b = args.batch_size

    def model_alone() -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            model.solve(x[:b].to(device), trajectory=True)  # warm-up
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(x), b):
                model.solve(x[i:i + b].to(device), trajectory=True)
            sync()
        return len(x) / (time.perf_counter() - t0)

    def scoring(k: int) -> tuple[float, float]:
        cfg = ScoreConfig(input_dir=str(images), out=str(work / f"out{k}.{args.format}"),
                          checkpoint=ckpt, batch_size=b, workers=args.workers, progress=False,
                          overwrite=True, threads=args.threads)
        t0 = time.perf_counter()
        summary = score_folder(cfg)
        wall = time.perf_counter() - t0
        assert summary.rows == len(files) and summary.errors == 0
        return summary.scored_now / summary.seconds, summary.rows / wall

    alone, loop, whole = [], [], []
    for k in range(args.repeats):
        alone.append(model_alone())
        s_loop, s_wall = scoring(k)
        loop.append(s_loop)
        whole.append(s_wall)
    a, s, w = max(alone), max(loop), max(whole)
    workers = default_workers() if args.workers is None else args.workers
    print(f"config: {len(files)} PNGs {spec.channels}x{spec.height}x{spec.width}, batch {b}, "
          f"{workers} decoding workers, torch threads {torch.get_num_threads()}, "
          f"device {device}, checkpoint {meta.name}, {os.cpu_count()} CPUs")
    print(f"model alone: {a:.0f} img/s | deqguard score: {s:.0f} img/s (whole command incl. "
          f"model load: {w:.0f} img/s) | ratio score/model = {s / a:.2f}x (target >= 0.9x); "
          f"whole command {w / a:.2f}x")


if __name__ == "__main__":
    main()
