"""What building the answers costs per image, one sample at a time against a batch at once.
Not a test.

The engine solves `--images` test images once (served default options: detection on, the
checkpoint's selective score at the requested `--coverage`); then, interleaved over `--rounds`
rounds, each row builds the answers of those traces in batches of `--batch` and prints ms per
image (median and min-max over rounds, this process's CPU time by default):
- before (what the compute thread ran): `AnswerBuilder.answer` one sample at a time with the
  learned detector's score as it was computed then (`@`, stacked features times the
  coefficients), and its parts: the detector (`Detector.__call__`), the selective decision
  (`Selector.__call__`), and the rest (label, probabilities, trajectories, the
  `ClassifyResult`: the whole minus the two);
- the per-sample `answer` with today's score (a cumulative sum), what other callers of it run;
- after: `AnswerBuilder.answers` on the batch and its parts `Detector.batch`, `Selector.batch`;
- `model_dump(mode="json")` of the answers (the runner's last step, the same on both paths).
The batched answers are checked equal to the per-sample ones (their JSON) before timing.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/answers_cost.py --checkpoint default
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from deqguard.evaluation.advsets import split_images
from deqguard.models.learned_detector import LogisticDetector


@contextlib.contextmanager
def _matmul_score() -> Iterator[None]:
    """The learned detector's score as it was computed before: stacked features @ coef."""
    def score(self, features):
        x = torch.stack([features[f] for f in self.features], dim=-1)
        return ((x - x.new_tensor(self.mean)) / x.new_tensor(self.std)
                ) @ x.new_tensor(self.coef) + self.intercept

    new = LogisticDetector.score
    LogisticDetector.score = score  # type: ignore[method-assign]
    try:
        yield
    finally:
        LogisticDetector.score = new  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--coverage", type=float, default=None,
                   help="request coverage (default: the served default, full coverage)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(args.checkpoint, device="cpu", threads=1)
    opts = engine.resolve(**({} if args.coverage is None else {"coverage": args.coverage}))
    x, _ = split_images("test", 0, args.images)
    traces = []
    for i in range(0, args.images, args.batch):
        traces += engine.trace(x[i:i + args.batch].numpy(), opts)
    batches = [traces[i:i + args.batch] for i in range(0, len(traces), args.batch)]
    ab, det, sel = engine.answers, engine.detector, engine.selector
    print(f"# bench/answers_cost.py: torch {torch.__version__}, 1 thread, CPU; checkpoint "
          f"{engine.meta.name or args.checkpoint}; {opts}; selective score "
          f"{sel.calibration.score if sel.calibration else None}; {len(traces)} images in "
          f"batches of {args.batch}; clock: {args.clock}")

    def dumps(results):
        return [r.model_dump_json() for r in results]

    same = all(dumps(ab.answers(b, [opts] * len(b), [True] * len(b)))
               == dumps([ab.answer(t, opts, True) for t in b]) for b in batches)
    print(f"batched answers == per-sample answers (JSON, every sample): {same}")

    def before(fn: Callable[[list], object]) -> Callable[[list], object]:
        def run(b: list) -> object:
            with _matmul_score():
                return fn(b)
        return run

    rows: dict[str, Callable[[list], object]] = {
        "before, per sample: whole answer": before(
            lambda b: [ab.answer(t, opts, True) for t in b]),
        "before, per sample: detector": before(
            lambda b: [det(t, opts.defense, opts.detect) for t in b]),
        "before, per sample: selective": before(lambda b: [sel(t, opts) for t in b]),
        "per sample, score as cumsum: whole answer": (
            lambda b: [ab.answer(t, opts, True) for t in b]),
        "after, batched: whole answers": (
            lambda b: ab.answers(b, [opts] * len(b), [True] * len(b))),
        "after, batched: detector": lambda b: det.batch(b, opts.defense, opts.detect),
        "after, batched: selective": lambda b: sel.batch(b, opts),
    }
    answers = [ab.answers(b, [opts] * len(b), [True] * len(b)) for b in batches]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn) -> float:
        t0 = clock()
        for b in batches:
            fn(b)
        return 1000.0 * (clock() - t0) / len(traces)

    def dump_all() -> float:
        t0 = clock()
        for res in answers:
            [r.model_dump(mode="json") for r in res]
        return 1000.0 * (clock() - t0) / len(traces)

    out: dict[str, list[float]] = {k: [] for k in [*rows, "model_dump(mode=json)"]}
    for fn in rows.values():
        timed(fn)  # warm-up
    for _ in range(args.rounds):
        for name, fn in rows.items():
            out[name].append(timed(fn))
        out["model_dump(mode=json)"].append(dump_all())
    for when in ("before, per sample", "after, batched"):
        whole = next(v for k, v in out.items() if k.startswith(f"{when}: whole"))
        dt, st = out[f"{when}: detector"], out[f"{when}: selective"]
        out[f"{when}: rest (whole - detector - selective)"] = [
            a - b - c for a, b, c in zip(whole, dt, st, strict=True)]
    print("\n| row | ms per image, median (min-max) |\n|---|---|")
    for name, t in out.items():
        print(f"| {name} | {statistics.median(t):.4f} ({min(t):.4f}-{max(t):.4f}) |")
    ratios = [a / b for a, b in zip(out["before, per sample: whole answer"],
                                    out["after, batched: whole answers"], strict=True)]
    print(f"\nbefore / after, whole answers, within each round: "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
