"""README's headline comparisons, image by image: one table of paired differences for pairs of
models, on the headline's three numbers (clean on 10,000 test images, the worst white-box case
and APGD-CE + APGD-T on the first 1,000).

The headline table gives each model's accuracy with its own standard error; two such figures
"within one standard error" of each other say little, because both models were scored on the
same images and share most of their right and wrong answers. Each model's folder holds the
three reports `bench/headline.py --evaluate` writes; this pairs them with `deqguard compare`'s
statistics (evaluation/paired.py) and prints one row per pair and number:

    python bench/paired.py --root docs/eval/wk/paired regulated-e15:plain-e15 \\
        regulated-e100:anchor-e30

A pair is A:B, two folder names under --root; the row says A - B. Reports written before
per-image outcomes were kept (before 2026-12-06) are refused: rerun their headline lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deqguard.evaluation.compare_cli import CELLS, cells
from deqguard.evaluation.paired import compare_reports

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headline import load, report_names  # noqa: E402  (the reports headline.py writes)

# (row label, report in headline.report_names, measure): README's headline numbers
HEADLINE = (("clean, 10,000", "full", "clean"),
            ("worst white-box, 1,000", "white", "worst-case"),
            ("APGD-CE + APGD-T, 1,000", "aa", "aa:apgd-t"))


class PairedError(Exception):
    pass


def _report(folder: Path, name: str) -> dict:
    report = load(folder, name)
    if report is None:
        raise PairedError(f"{folder / name}.json: missing (run bench/headline.py --evaluate "
                          "for it)")
    return report


def rows(root: Path, pair: str, reps: int = 10_000) -> list[str]:
    """The table rows of one A:B pair, one per headline number."""
    a, sep, b = pair.partition(":")
    if not (sep and a and b):
        raise PairedError(f"{pair!r}: name a pair as A:B, two folders under {root}")
    out, names = [], report_names()
    for label, key, measure in HEADLINE:
        name = names[key]
        diffs, _ = compare_reports(_report(root / a, name), _report(root / b, name), reps=reps)
        if measure not in diffs:
            raise PairedError(f"{a}:{b}: {name} keeps no per-image {measure} in both reports "
                              "(written before per-image outcomes were kept? rerun it)")
        out.append("| " + " | ".join([a, b, label, *cells(diffs[measure])]) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", metavar="A:B")
    parser.add_argument("--root", default="docs/eval/wk/paired",
                        help="folder holding one folder of headline reports per model")
    parser.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    try:
        body = [r for pair in args.pairs for r in rows(Path(args.root), pair, args.reps)]
    except (PairedError, ValueError) as exc:
        print(f"bench/paired.py: {exc}", file=sys.stderr)
        return 2
    print("| A | B | number | " + " | ".join(CELLS) + " |")
    print("|---|---|---|" + "---:|" * len(CELLS))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
