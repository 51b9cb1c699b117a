"""`deqguard eval-merge`: reports of consecutive image ranges, one eval line's, as one report.

    deqguard eval CKPT --n 500 --attacks clean,aa --json part1.json
    deqguard eval CKPT --start 500 --n 500 --attacks clean,aa --json part2.json
    deqguard eval-merge part1.json part2.json --json aa-n1000.json

The merged report holds the per-image outcomes in image order, accuracies counted from them and
the parts' times added; `merged_from` names each part. The parts must come from the same line
(every setting but --start and --n), follow one another without gap or overlap, and hold only
the clean and aa parts, the ones kept per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deqguard.errors import DeqguardError


def _load(path: Path):
    from pydantic import ValidationError

    from .schema import EvalReport

    try:
        return EvalReport.model_validate_json(path.read_text())
    except OSError as exc:
        raise DeqguardError(f"{path}: cannot read it ({exc})") from exc
    except ValidationError as exc:
        raise DeqguardError(f"{path}: not a deqguard eval JSON report "
                            f"({exc.error_count()} problems, first: {exc.errors()[0]['msg']})"
                            ) from exc


def _run(args: argparse.Namespace) -> int:
    from .eval_summary import for_people, summary
    from .merge import merge_reports

    paths = [Path(p) for p in args.reports]
    out = Path(args.json)
    if out.resolve() in {p.resolve() for p in paths}:
        raise DeqguardError(f"--json {out} is one of the parts: write the merge elsewhere")
    try:
        merged = merge_reports([_load(p) for p in paths], names=[str(p) for p in paths])
    except ValueError as exc:
        raise DeqguardError(str(exc)) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(merged.model_dump_json(indent=2))
    print(json.dumps(for_people(summary(merged)), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-merge", help="join deqguard eval reports of consecutive image "
                       "ranges (--start/--n) into one report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="REPORT",
                   help="deqguard eval JSON reports, in any order")
    p.add_argument("--json", required=True, metavar="FILE", help="where to write the merged "
                   "report (not one of the parts)")
    p.set_defaults(func=_run)
