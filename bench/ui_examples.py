"""Make the example images the /ui page offers: Fashion-MNIST test images, clean and attacked.

Not a benchmark, but it lives here with the other scripts that use training code on the shipped
model (the serving package must not import training/). It attacks the shipped default with the
project's own PGD (deqguard.training.attacks.pgd_ce, the checkpoint's validation settings),
keeps pairs where the clean image is classified correctly and its 8-bit PNG-rounded adversarial
twin is not, and writes them with an index.json into serving/ui/static/examples/:

    OMP_NUM_THREADS=1 .venv/bin/python bench/ui_examples.py
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deqguard.models import load_checkpoint
from deqguard.training.attacks import pgd_ce
from deqguard.training.data import load_dataset

OUT = Path(__file__).resolve().parents[1] / "serving" / "ui" / "static" / "examples"


def png_bytes(x: torch.Tensor) -> bytes:
    arr = (x[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from deqguard.serving.images import decode_image

    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    model.eval()
    ds = load_dataset("fashion-mnist", "test", limit=args.candidates)
    x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    pgd = meta.metrics.get("val_pgd") or {"eps": 0.1, "steps": 10, "step_size": 0.025}
    x_adv = pgd_ce(model, x, y, eps=pgd["eps"], step_size=pgd["step_size"], steps=pgd["steps"],
                   generator=torch.Generator().manual_seed(0))

    def predict(png: bytes) -> int:
        arr = decode_image(png, channels=1, height=28, width=28)
        with torch.inference_mode():
            return int(model.solve(torch.from_numpy(arr)[None], trajectory=False)
                       .logits.argmax(-1))

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    examples, used = [], set()
    for i in range(len(x)):
        label = int(y[i])
        if label in used:
            continue
        clean, adv = png_bytes(x[i]), png_bytes(x_adv[i])
        p_clean, p_adv = predict(clean), predict(adv)
        if p_clean != label or p_adv == label:
            continue
        used.add(label)
        name = meta.classes[label].lower().replace("/", "-").replace(" ", "-")
        for kind, data, pred in (("clean", clean, p_clean), ("pgd", adv, p_adv)):
            file = f"{i:04d}-{name}-{kind}.png"
            (args.out / file).write_bytes(data)
            examples.append({"file": file, "true_class": meta.classes[label],
                             "attacked": kind == "pgd", "predicted_when_made": meta.classes[pred],
                             "caption": f"test image {i}, {meta.classes[label]}, "
                                        + ("clean" if kind == "clean" else
                                           f"PGD eps {pgd['eps']}, {pgd['steps']} steps")})
        if len(used) == args.pairs:
            break
    index = {"checkpoint": meta.name, "sha256": meta.sha256, "attack": {"name": "pgd_ce", **pgd},
             "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/ui_examples.py",
             "examples": examples}
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{len(examples)} images in {args.out}")


if __name__ == "__main__":
    main()
