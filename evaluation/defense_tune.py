"""Settings of the Sec 3.2 defense chosen on validation images, never on test images.

The defense's defaults are the paper's (4 rounds x 2 solver steps, 10 input steps of eps/4),
tuned for another model. Each setting of a grid is scored on the first N images of the
checkpoint's validation split (carved from train, never trained on): clean accuracy, accuracy
under exact-gradient PGD *through* the defense (BPDA path "exact", and "full" when asked: the
exact gradient through the input updates too), and its cost next to the undefended solve,
timed interleaved. Every setting meets the same images and the same random starts, so the
comparisons are paired. The rule that picks one is fixed before looking (`choose`): the most
robust setting whose clean accuracy is within `max_clean_drop` of the undefended model's. The
test split is never read here: what the choice is worth is measured afterwards by
`deqguard eval --defense entropy-reduction --defense-set ...` on test images.

    python -m deqguard.evaluation.defense_tune default --n 200 --out tune.json
    python -m deqguard.evaluation.defense_tune CKPT --grid "rounds=2,4 input_steps=3,10" \\
        --paths exact,full --out tune.json       # a rerun with the same --out resumes

Nothing in the defense is random (its input steps are signed gradients), so no EOT is needed.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from deqguard.errors import DeqguardError
from deqguard.models.classifier import Classifier
from deqguard.models.defense import FULL_GRADIENT, EntropyReductionConfig, entropy_reduction_solve
from deqguard.shipped import SHIPPED_NAMES

from .attacks import AttackSpec, default_step_size, run_attack
from .paired import paired_difference
from .per_sample import bits, unbits

DEFAULT_GRID = "rounds=2,4 solver_steps_per_round=2,4,8 input_steps=3,10"
PATHS = ("exact", FULL_GRADIENT)


class TuneSettings(BaseModel):
    """What a tuning run measured on; a resumed run must match it exactly."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    sha256: str
    data: str
    data_dir: str | None
    split: str = "val"
    val_size: int
    split_seed: int
    n: int
    eps: float
    pgd_steps: int
    step_size: float
    paths: list[str]
    max_clean_drop: float
    seed: int
    batch_size: int


class Reference(BaseModel):
    """The undefended model on the same images: clean, and exact-gradient PGD."""

    clean_accuracy: float
    robust_accuracy: float
    clean_correct: str  # per sample, "1" correct: the paired intervals are computed from these
    robust_correct: str


class TunePoint(BaseModel):
    """One setting: accuracies, per-path robust accuracy, cost, and paired gains over undefended.

    `robust_accuracy` counts a sample only if it is correct clean and under every path.
    """

    config: EntropyReductionConfig
    clean_accuracy: float
    robust_accuracy: float
    per_path: dict[str, float]
    seconds_per_sample: float
    seconds_per_sample_undefended: float
    overhead_ratio: float
    clean_correct: str
    robust_correct: str
    clean_gain: float = 0.0
    clean_gain_interval: list[float] | None = None
    robust_gain: float = 0.0
    robust_gain_interval: list[float] | None = None
    eligible: bool = False


class DefenseTuneReport(BaseModel):
    settings: TuneSettings
    rule: str
    undefended: Reference | None = None
    points: list[TunePoint] = []
    best: int | None = None
    best_config: EntropyReductionConfig | None = None
    pays: bool = False
    verdict: str = ""
    command: str = ""
    load: str = ""


RULE = ("the highest robust accuracy (clean and every attack path) among settings whose clean "
        "accuracy is at least the undefended model's minus max_clean_drop; ties: higher clean "
        "accuracy, then lower cost. It pays when the 95% bootstrap interval of its paired robust "
        "gain over the undefended model lies above 0 and its clean accuracy is within "
        "max_clean_drop.")


def parse_grid(text: str) -> list[EntropyReductionConfig]:
    """'rounds=2,4 input_steps=3,10' -> the product of the listed EntropyReductionConfig fields;
    the served default is always added (the reference every gain is read against)."""
    import yaml

    axes: dict[str, list] = {}
    for item in text.replace(";", " ").split():
        if "=" not in item:
            raise DeqguardError(f"--grid expects key=v1,v2 items, got {item!r}")
        key, values = item.split("=", 1)
        if key not in EntropyReductionConfig.model_fields:
            raise DeqguardError(f"--grid: unknown setting {key!r}; choose from "
                                f"{', '.join(EntropyReductionConfig.model_fields)}")
        axes[key] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    configs = [EntropyReductionConfig()]
    for combo in itertools.product(*axes.values()):
        try:
            cfg = EntropyReductionConfig.model_validate(dict(zip(axes, combo, strict=True)))
        except ValidationError as exc:
            raise DeqguardError(f"--grid: invalid setting {dict(zip(axes, combo, strict=True))}"
                                f": {exc.errors()[0]['msg']}") from None
        if cfg not in configs:
            configs.append(cfg)
    return configs


def validation_images(meta, n: int, data_dir: str | None = None
                      ) -> tuple[Tensor, Tensor, dict]:
    """The first n images of the checkpoint's validation split, and where they came from.

    Only the "val" split is ever requested: the choice must not see test images.
    """
    from deqguard.training.data import load_dataset

    from .eval_command import recorded_data

    rec = recorded_data(meta)
    data = rec.get("dataset")
    if not data:
        raise DeqguardError("the checkpoint records no dataset (training.config.data): its "
                            "validation split is unknown")
    if data_dir is None and rec.get("data_dir") and Path(rec["data_dir"]).is_dir():
        data_dir = str(rec["data_dir"])
    val_size, seed = int(rec.get("val_size", 5000)), int(rec.get("split_seed", 0))
    ds = load_dataset(data, "val", data_dir=data_dir, limit=n, val_size=val_size, seed=seed)
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    where = {"data": data, "data_dir": data_dir, "val_size": val_size, "split_seed": seed}
    return torch.stack(list(xs)), torch.tensor(ys, dtype=torch.long), where


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, bs: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def _spec(s: TuneSettings, kind: str, path: str) -> AttackSpec:
    return AttackSpec(name=f"{kind}-pgd{s.pgd_steps}-{path}", kind=kind,  # type: ignore[arg-type]
                      eps=s.eps, steps=s.pgd_steps, step_size=s.step_size, gradient=path)


def _generator(s: TuneSettings) -> torch.Generator:
    """The same random starts for every setting: the comparisons are paired."""
    return torch.Generator().manual_seed(s.seed)


def score_undefended(model: Classifier, x: Tensor, y: Tensor, s: TuneSettings) -> Reference:
    def predict(xb: Tensor) -> Tensor:
        return model.solve(xb, trajectory=False).logits.argmax(1)

    clean = _batched(predict, x, s.batch_size) == y
    _, ok = run_attack(model, _spec(s, "pgd", "exact"), x, y, predict,
                       batch_size=s.batch_size, generator=_generator(s))
    robust = clean & ok
    return Reference(clean_accuracy=float(clean.float().mean()),
                     robust_accuracy=float(robust.float().mean()),
                     clean_correct=bits(clean), robust_correct=bits(robust))


def cost_ratio(model: Classifier, cfg: EntropyReductionConfig, x: Tensor, bs: int,
               repeats: int) -> tuple[float, float]:
    """(defended, undefended) seconds per image, best of `repeats`, timed interleaved."""
    best = [float("inf"), float("inf")]
    solves = (lambda xb: entropy_reduction_solve(model, xb, cfg, trajectory=False).logits,
              lambda xb: model.solve(xb, trajectory=False).logits)
    _batched(solves[0], x[:2], 2)  # warm-up
    for _ in range(repeats):
        for i, solve in enumerate(solves):
            t0 = time.perf_counter()
            _batched(solve, x, bs)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / len(x), best[1] / len(x)


def score_config(model: Classifier, cfg: EntropyReductionConfig, x: Tensor, y: Tensor,
                 s: TuneSettings, repeats: int = 2) -> TunePoint:
    """Clean and attacked accuracy of the defended model, attacked through the defense."""
    cfg = cfg.resolved(model)

    def predict(xb: Tensor) -> Tensor:
        return entropy_reduction_solve(model, xb, cfg, trajectory=False).logits.argmax(1)

    clean = _batched(predict, x, s.batch_size) == y
    robust, per_path = clean.clone(), {}
    for path in s.paths:
        _, ok = run_attack(model, _spec(s, "bpda", path), x, y, predict, defense=cfg,
                           batch_size=s.batch_size, generator=_generator(s))
        per_path[path] = float(ok.float().mean())
        robust &= ok
    t_def, t_undef = cost_ratio(model, cfg, x, s.batch_size, repeats)
    return TunePoint(config=cfg, clean_accuracy=float(clean.float().mean()),
                     robust_accuracy=float(robust.float().mean()), per_path=per_path,
                     seconds_per_sample=t_def, seconds_per_sample_undefended=t_undef,
                     overhead_ratio=t_def / t_undef, clean_correct=bits(clean),
                     robust_correct=bits(robust))


def compare(point: TunePoint, ref: Reference, max_clean_drop: float, reps: int = 1000) -> None:
    """Fill in the paired gains over the undefended model and eligibility (in place); the gains
    and their intervals are `deqguard compare`'s paired differences on the same images."""
    clean = paired_difference(unbits(point.clean_correct), unbits(ref.clean_correct), reps=reps)
    robust = paired_difference(unbits(point.robust_correct), unbits(ref.robust_correct),
                               reps=reps)
    point.clean_gain, point.robust_gain = clean.difference, robust.difference
    point.clean_gain_interval, point.robust_gain_interval = clean.interval, robust.interval
    point.eligible = point.clean_gain >= -max_clean_drop - 1e-9


def choose(points: list[TunePoint]) -> int | None:
    """The index `RULE` picks among eligible points (None when none is eligible)."""
    ok = [i for i, p in enumerate(points) if p.eligible]
    if not ok:
        return None
    return max(ok, key=lambda i: (points[i].robust_accuracy, points[i].clean_accuracy,
                                  -points[i].overhead_ratio))


def verdict(report: DefenseTuneReport) -> tuple[bool, str]:
    if report.best is None:
        return False, ("no setting keeps clean accuracy within max_clean_drop of the "
                       "undefended model on validation")
    p = report.points[report.best]
    lo = p.robust_gain_interval[0] if p.robust_gain_interval else float("nan")
    pays = bool(lo > 0)
    return pays, (f"best on validation: robust {p.robust_accuracy:.3f} ({p.robust_gain:+.3f} "
                  f"vs undefended, 95% CI {p.robust_gain_interval}), clean "
                  f"{p.clean_accuracy:.3f} ({p.clean_gain:+.3f}), at {p.overhead_ratio:.1f}x "
                  f"the cost: {'pays' if pays else 'no gain beyond noise'} on validation")


def tune(model: Classifier, x: Tensor, y: Tensor, report: DefenseTuneReport,
         grid: list[EntropyReductionConfig], *, save: Callable[[DefenseTuneReport], None],
         log: Callable[[str], None] = print, repeats: int = 2) -> DefenseTuneReport:
    """Score every setting of `grid` not yet in `report` (a resumed run keeps its points)."""
    if not model.is_deq:
        raise DeqguardError("the entropy-reduction defense needs a DEQ checkpoint")
    s = report.settings
    if report.undefended is None:
        report.undefended = score_undefended(model, x, y, s)
        save(report)
    ref = report.undefended
    log(f"undefended: clean {ref.clean_accuracy:.3f} robust {ref.robust_accuracy:.3f}")
    done = {p.config.model_dump_json() for p in report.points}
    for cfg in grid:
        key = cfg.resolved(model).model_dump_json()
        if key in done:
            continue
        point = score_config(model, cfg, x, y, s, repeats)
        compare(point, ref, s.max_clean_drop)
        report.points.append(point)
        done.add(key)
        log(f"{key}: clean {point.clean_accuracy:.3f} robust {point.robust_accuracy:.3f} "
            f"{point.per_path} cost {point.overhead_ratio:.2f}x")
        report.best = choose(report.points)
        report.best_config = None if report.best is None else report.points[report.best].config
        report.pays, report.verdict = verdict(report)
        save(report)
    return report


# -- command line ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deqguard.evaluation.defense_tune",
        description="Grid-search the entropy-reduction defense's settings on the checkpoint's "
        "validation images (never test): clean accuracy, exact-gradient PGD through the "
        "defense, cost against the undefended solve. Writes --out after every setting; a "
        "rerun with the same --out and settings resumes.")
    p.add_argument("checkpoint",
                   help=f"a .safetensors checkpoint or a shipped name ({SHIPPED_NAMES})")
    p.add_argument("--out", required=True, help="the report (JSON), also the resume state")
    p.add_argument("--n", type=int, default=200, help="first N validation images")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help="EntropyReductionConfig fields and their values, e.g. 'rounds=2,4 "
                        "eps=0.05,0.1'; the served default is always added "
                        "(default: %(default)s)")
    p.add_argument("--paths", default="exact",
                   help="gradient paths through the defense, a comma list of exact (BPDA: "
                        "input updates as the identity) and full (exact through them too)")
    p.add_argument("--eps", type=float, help="attack radius (default: the model's threat eps)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--step-size", type=float, help="PGD step (default: 2.5 eps / steps)")
    p.add_argument("--max-clean-drop", type=float, default=0.01,
                   help="clean accuracy a setting may lose against the undefended model")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best of)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--data-dir", help="where the checkpoint's dataset is (default: recorded)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def _load(out: Path, settings: TuneSettings, command: str) -> DefenseTuneReport:
    if out.exists():
        old = DefenseTuneReport.model_validate_json(out.read_text())
        if old.settings != settings:
            raise DeqguardError(f"{out} holds a run with other settings; pass another --out")
        return old
    return DefenseTuneReport(settings=settings, rule=RULE, command=command)


def run(argv: list[str] | None = None) -> int:
    from deqguard.fileio import atomic_write_bytes
    from deqguard.models.checkpoint import load_checkpoint, resolve_checkpoint
    from deqguard.models.defense import default_eps

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [v.strip() for v in args.paths.split(",") if v.strip()]
    if not paths or set(paths) - set(PATHS):
        raise DeqguardError(f"--paths: choose from {', '.join(PATHS)}, got {args.paths!r}")
    grid = parse_grid(args.grid)
    path = resolve_checkpoint(args.checkpoint)
    model, meta = load_checkpoint(path, device="cpu")
    x, y, where = validation_images(meta, args.n, args.data_dir)
    eps = args.eps if args.eps is not None else default_eps(meta.input.channels,
                                                             meta.input.height)
    settings = TuneSettings(
        checkpoint=str(args.checkpoint), sha256=meta.sha256, n=len(x), eps=eps,
        pgd_steps=args.pgd_steps,
        step_size=args.step_size or default_step_size(eps, args.pgd_steps), paths=paths,
        max_clean_drop=args.max_clean_drop, seed=args.seed, batch_size=args.batch_size,
        **where)
    command = " ".join(["python -m deqguard.evaluation.defense_tune",
                        *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    report = _load(out, settings, command)
    report.load = _uptime()

    def save(r: DefenseTuneReport) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, r.model_dump_json(indent=2).encode())

    tune(model.eval(), x, y, report, grid, save=save,
         log=lambda m: print(m, flush=True), repeats=args.repeats)
    print(report.verdict)
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except DeqguardError as exc:
        print(f"defense_tune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
