"""`deqguard compare`: two models' `deqguard eval` reports on the same images, image by image.

    deqguard compare a/aa-n1000.json b/aa-n1000.json
    deqguard compare docs/eval/wk/paired/regulated-e15 docs/eval/wk/paired/plain-e15 --json d.json

Given two folders, every report name both hold is compared (the headline's three lines per model:
clean-budget-n10000, whitebox-n1000, aa-n1000). Each measure a report keeps per image (clean, the
per-image worst case, each AutoAttack stage) gives A's and B's accuracy, the difference A - B with
its bootstrap 95% interval over images, the images only one of them gets right, McNemar's exact
p-value, and the paired and unpaired standard errors of the difference: the unpaired one is what
"within one standard error" of two separate ± figures amounts to, and overstates the noise.
Reports written before per-image outcomes were kept (before 2026-12-06) cannot be paired: rerun
their `deqguard eval` line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqguard.errors import DeqguardError

if TYPE_CHECKING:
    from .paired import PairedDifference

# numpy is imported inside the handler: `deqguard compare --help` loads nothing heavy.


def _load(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeqguardError(f"{path}: not a readable deqguard eval JSON report ({exc})") from exc
    if not isinstance(report, dict) or "settings" not in report:
        raise DeqguardError(f"{path}: not a deqguard eval JSON report (no settings)")
    return report


def _pairs(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    """(label, report of A, report of B): the two files, or the names two folders share."""
    if a.is_dir() != b.is_dir():
        raise DeqguardError("give two report files or two folders of reports, not one of each")
    if not a.is_dir():
        for p in (a, b):
            if not p.is_file():
                raise DeqguardError(f"{p}: no such report")
        return [(a.stem if a.name == b.name else f"{a.stem} / {b.stem}", a, b)]
    names = sorted({p.name for p in a.glob("*.json")} & {p.name for p in b.glob("*.json")})
    if not names:
        raise DeqguardError(f"{a} and {b} hold no JSON report of the same name")
    return [(Path(n).stem, a / n, b / n) for n in names]


CELLS = ("A", "B", "A - B (points)", "95% interval", "only A right", "only B right", "McNemar p",
         "paired SE", "unpaired SE")


def cells(d: PairedDifference) -> list[str]:
    """One comparison as table cells, in the order of CELLS (accuracies in %, the rest in
    points)."""
    p = f"{d.p_value:.3f}" if d.p_value >= 0.001 else f"{d.p_value:.1e}"
    return [_pct(d.accuracy_a), _pct(d.accuracy_b), _pts(d.difference),
            f"[{_pts(d.interval[0])}, {_pts(d.interval[1])}]", str(d.only_a), str(d.only_b), p,
            f"{100 * d.paired_se:.2f}", f"{100 * d.unpaired_se:.2f}"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _images(skip: int, first: int | None, ranges: set[tuple[int, int]]) -> str:
    """The header line naming the image range, empty when every row pairs the first images both
    reports scored. The range comes from the images actually paired, not from --skip and
    --first, which may ask for more than the reports scored."""
    if first is None and not skip and all(lo == 0 for lo, _ in ranges):
        return ""
    if len(ranges) == 1:
        ((lo, hi),) = ranges
        return f"images {lo + 1} to {hi}\n"
    lo = min(lo for lo, _ in ranges)
    return f"images from {lo + 1} on, as many as each row's images column says\n"


def _run(args: argparse.Namespace) -> int:
    from .paired import compare_reports

    a, b = Path(args.a), Path(args.b)
    rows, notes, records = [], [], []
    for label, pa, pb in _pairs(a, b):
        ra, rb = _load(pa), _load(pb)
        try:
            diffs, why = compare_reports(ra, rb, reps=args.reps, seed=args.seed,
                                         skip=args.skip, first=args.first)
        except ValueError as exc:
            raise DeqguardError(f"{pa} and {pb}: {exc}") from exc
        notes += [f"{label}: {w}" for w in why]
        for measure, d in diffs.items():
            rows.append("| " + " | ".join([label, measure, str(d.n), *cells(d)]) + " |")
            records.append({"report": label, "a": str(pa), "b": str(pb), "measure": measure,
                            **asdict(d)})
    if not rows:
        raise DeqguardError("no measure both reports keep per image: reports written before "
                            "per-image outcomes were kept need their deqguard eval line rerun"
                            + ("; " + "; ".join(notes) if notes else ""))
    print(f"A: {a}\nB: {b}\n" + _images(args.skip, args.first,
                                              {(r["start"], r["start"] + r["n"]) for r in records}))
    print("| report | measure | images | " + " | ".join(CELLS) + " |")
    print("|---|---|---:|" + "---:|" * len(CELLS))
    print("\n".join(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": str(a), "b": str(b), "reps": args.reps,
                                               "seed": args.seed, "skip": args.skip,
                                               "first": args.first, "rows": records,
                                               "notes": notes}, indent=1) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="two models' eval reports on the same images, image by "
                       "image: paired differences, intervals and McNemar's test",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="a deqguard eval JSON report, or a folder of them")
    p.add_argument("b", metavar="B", help="the report (or folder) to compare A against: A - B")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON to FILE")
    p.add_argument("--reps", type=int, default=10_000,
                   help="bootstrap resamples of the images (default: 10000)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap, so a rerun prints the same interval (default: 0)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N images: check a difference seen on them on the "
                        "images after them (default: 0)")
    p.add_argument("--first", type=int, default=None, metavar="N",
                   help="pair only the first N images (with --skip: images skip+1 to N) "
                        "(default: every image both reports scored)")
    p.set_defaults(func=_run)
