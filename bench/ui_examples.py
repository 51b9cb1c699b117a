"""Make the /ui page's examples: test images chosen for what the served engine does on them.

Not a benchmark, but it lives here with the other scripts that use training code on the shipped
model (the serving package must not import training/). Candidates are Fashion-MNIST test images,
clean and attacked with the project's own PGD (deqguard.training.attacks.pgd_ce, the checkpoint's
validation settings), each written as the 8-bit PNG a visitor would upload. The engine the server
runs (serving.factory.load_engine) answers every candidate twice: the page's default request
(coverage 1) and the request at `--coverage`. For each role of serving/ui/examples.py (a clean
image answered right, a caught attack, a missed attack, an abstention, a false alarm) the script
keeps a candidate whose answers fit it, and writes the PNGs with an index.json recording, per
example, its role, caption and what the engine returned, plus the checkpoint's name and sha256,
the attack and this command, into serving/ui/static/examples/:

    OMP_NUM_THREADS=1 .venv/bin/python bench/ui_examples.py

Candidates are scanned in order, a chunk at a time, until every role is filled (about a minute on
one CPU thread for the shipped default). A required role no candidate fits is an error (exit 2)
unless --allow-missing.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deqguard.errors import DeqguardError
from deqguard.serving.ui.examples import REQUIRED, ROLES, choose, correct

OUT = Path(__file__).resolve().parents[1] / "serving" / "ui" / "static" / "examples"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python bench/ui_examples.py"


def png_bytes(x: Any) -> bytes:
    """A [1, H, W] tensor in [0, 1] -> 8-bit grayscale PNG bytes (what a visitor uploads)."""
    from PIL import Image

    arr = (x[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def served_answer(engine: Any, png: bytes, opts: Any) -> dict[str, Any]:
    """What POST /classify answers for `png` under `opts`: the upload's decoding, then the
    engine's one-image path (run as a pair, as the server runs lone requests)."""
    from deqguard.serving.images import decode_image

    s = engine.spec
    arr = decode_image(png, channels=s.channels, height=s.height, width=s.width)
    return engine.classify(arr[None], opts, trajectory=False)[0].model_dump(mode="json")


def recorded(answer: dict[str, Any]) -> dict[str, Any]:
    """The parts of an answer the index keeps (the trajectories are redrawn by the page)."""
    return {"class_name": answer["class_name"], "label": answer["label"],
            "p_max": max(answer["probabilities"]), "iterations": answer["iterations"],
            "detection": answer["detection"], "abstained": answer["abstained"],
            "selective": answer["selective"]}


def _vs(score: float | None, threshold: float | None, over: bool, digits: int = 2) -> str:
    if score is None or threshold is None:
        return "not calibrated"
    return f"{score:.{digits}f} {'>' if over else '<='} threshold {threshold:.{digits}f}"


def caption(role: str, ex: dict[str, Any], answer: dict[str, Any], at_cov: dict[str, Any],
            attack: str, chosen_by: str) -> str:
    """The sentence the page shows for an example: what it is, what the service does on it."""
    source = (f"Fashion-MNIST test image {ex['source']['index']} ({ex['true_class']}), "
              + (f"attacked with {attack}" if ex["attacked"] else "clean"))
    cls = answer["class_name"]
    right = "right" if correct(ex, answer) else "wrong"
    det = answer["detection"]
    flag = _vs(det["score"], det["threshold"], det["suspicious"])
    sel = at_cov["selective"]
    cov = sel["coverage"]
    what = {
        "clean": f"the service answers {cls} ({right}), does not flag it (detector {flag}) and "
                 f"also answers it at coverage {cov:g}",
        "caught": f"the service answers {cls} ({right}) and flags it suspicious "
                  f"(detector {flag})",
        "missed": f"the service answers {cls} ({right}) and does not flag it (detector {flag}): "
                  "the detector misses this attack",
        "abstained": f"at coverage {cov:g} the service abstains (doubt {sel['score_name']} "
                     f"{_vs(sel['score'], sel['threshold'], True, 3)}); its withheld best guess, "
                     f"{at_cov['class_name']}, would be "
                     f"{'right' if correct(ex, at_cov) else 'wrong'}. The page sends coverage "
                     f"{cov:g} for this example",
        "false-alarm": f"the service answers {cls} ({right}) yet flags it suspicious "
                       f"(detector {flag}); the detector is calibrated to flag about "
                       f"{det['fpr'] or 0:.0%} of clean images",
    }[role]
    return f"{ROLES[role][0].upper()}{ROLES[role][1:]}: {source}; {what}. {chosen_by}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default",
                    help="checkpoint path or shipped name (default: default)")
    ap.add_argument("--data-dir", default=None,
                    help="Fashion-MNIST folder (default: the usual places)")
    ap.add_argument("--candidates", type=int, default=96,
                    help="most test images to scan, in order (default: 96)")
    ap.add_argument("--chunk", type=int, default=16, help="images attacked at a time")
    ap.add_argument("--coverage", type=float, default=0.9,
                    help="the coverage of the abstention example and of the clean example's "
                         "answer (default: 0.9)")
    ap.add_argument("--eps", type=float, default=None,
                    help="attack radius (default: the checkpoint's val_pgd, else 0.1)")
    ap.add_argument("--steps", type=int, default=None, help="attack steps (default: as --eps)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the attack's random starts")
    ap.add_argument("--allow-missing", action="store_true",
                    help="write what was found even when a required role is missing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.candidates < 1 or args.chunk < 1:
        ap.error("--candidates and --chunk must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return make_examples(args, argv if argv is not None else sys.argv[1:])
    except DeqguardError as exc:
        print(f"ui_examples: error: {exc}", file=sys.stderr)
        return 2


def make_examples(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from deqguard.models import load_checkpoint
    from deqguard.serving.engine import OptionsError
    from deqguard.serving.factory import load_engine
    from deqguard.serving.settings import load_settings
    from deqguard.training.attacks import pgd_ce
    from deqguard.training.data import load_dataset

    torch.set_num_threads(1)
    engine = load_engine(load_settings({"checkpoint": args.checkpoint, "backend": "torch",
                                        "device": "cpu", "threads": 1}))
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    model.eval()
    try:
        default_opts, cov_opts = engine.resolve(), engine.resolve(coverage=args.coverage)
    except OptionsError as exc:
        raise DeqguardError(f"--coverage {args.coverage:g}: {exc}") from None
    pgd = dict(meta.metrics.get("val_pgd") or {"eps": 0.1, "steps": 10, "step_size": 0.025})
    if args.eps is not None or args.steps is not None:
        pgd["eps"] = args.eps if args.eps is not None else pgd["eps"]
        pgd["steps"] = args.steps if args.steps is not None else pgd["steps"]
        pgd["step_size"] = 2.5 * pgd["eps"] / pgd["steps"]  # Madry's rule, as val_pgd's
    attack = f"PGD (eps {pgd['eps']:g}, {pgd['steps']} steps)"
    command = shlex.join([*shlex.split(COMMAND), *argv])
    chosen_by = (f"Chosen by `{command}` from what the served engine returned on checkpoint "
                 f"{meta.name} (sha256 {meta.sha256[:12]}…).")

    ds = load_dataset("fashion-mnist", "test", data_dir=args.data_dir, limit=args.candidates)
    candidates: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    pngs: list[bytes] = []
    picked: dict[str, int] = {}
    for start in range(0, len(ds), args.chunk):
        idx = range(start, min(start + args.chunk, len(ds)))
        x = torch.stack([torch.as_tensor(ds[i][0]) for i in idx])
        y = torch.tensor([int(ds[i][1]) for i in idx])
        x_adv = pgd_ce(model, x, y, eps=pgd["eps"], step_size=pgd["step_size"],
                       steps=pgd["steps"],
                       generator=torch.Generator().manual_seed(args.seed * 1_000_003 + start))
        for j, i in enumerate(idx):
            for attacked, img in ((False, x[j]), (True, x_adv[j])):
                png = png_bytes(img)
                ex = {"true_class": meta.classes[int(y[j])], "attacked": attacked,
                      "source": {"dataset": "fashion-mnist", "split": "test", "index": i}}
                candidates.append((ex, served_answer(engine, png, default_opts),
                                   served_answer(engine, png, cov_opts)))
                pngs.append(png)
        picked = choose(candidates)
        print(f"{idx.stop} images scanned: {sorted(picked)}", file=sys.stderr)
        if len(picked) == len(ROLES):
            break
    missing = [r for r in REQUIRED if r not in picked]
    if missing and not args.allow_missing:
        raise DeqguardError(
            f"no candidate among the first {len(candidates) // 2} test images fits "
            f"{', '.join(missing)}: scan more with --candidates, or try another --coverage")

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    examples = []
    for role in ROLES:
        if role not in picked:
            continue
        ex, answer, at_cov = candidates[picked[role]]
        name = ex["true_class"].lower().replace("/", "-").replace(" ", "-")
        file = (f"{role}-{ex['source']['index']:04d}-{name}-"
                f"{'pgd' if ex['attacked'] else 'clean'}.png")
        (args.out / file).write_bytes(pngs[picked[role]])
        examples.append({
            "file": file, "role": role, "title": ROLES[role], **ex,
            "caption": caption(role, ex, answer, at_cov, attack, chosen_by),
            "request": {"coverage": args.coverage} if role == "abstained" else {},
            "answer": recorded(answer), "answer_at_coverage": recorded(at_cov)})
    index = {
        "checkpoint": meta.name, "sha256": meta.sha256, "command": command,
        "engine": {"backend": engine.backend, "default_request": _options(default_opts),
                   "coverage": args.coverage},
        "attack": {"name": "pgd_ce", "seed": args.seed, **pgd},
        "candidates_scanned": len(candidates) // 2, "roles_missing": missing,
        "examples": examples}
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{len(examples)} examples ({', '.join(e['role'] for e in examples)}) in {args.out}")
    return 0


def _options(opts: Any) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in ("solver", "max_iter", "tol", "settle_iters",
                                          "settle_entropy", "detect")}


if __name__ == "__main__":
    raise SystemExit(main())
