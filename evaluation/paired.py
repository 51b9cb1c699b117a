"""Two models scored on the same images, compared image by image.

Accuracies of two models on the same 1,000 images are not independent: both get the easy images
right and the hard ones wrong, and they differ only where one is right and the other wrong. Their
difference's error is computed from those discordant images (the paired standard error, a
bootstrap interval over images, and McNemar's exact test); the unpaired error, which treats the two
accuracies as independent samples, overstates it, and with it "within the noise".

Only numpy: a comparison reads two `deqguard eval` JSON reports and loads no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .bootstrap import interval
from .per_sample import image_range, unbits

AA_PREFIX = "aa:"


@dataclass(frozen=True)
class PairedDifference:
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    only_a: int  # images A gets right and B wrong
    only_b: int
    paired_se: float  # standard error of the per-image difference's mean
    unpaired_se: float  # as if the two accuracies came from different images
    interval: list[float]  # bootstrap 95% percentile interval of the difference, over images
    p_value: float  # McNemar's exact two-sided test of only_a against only_b
    start: int = 0  # images of the split before the n paired (compare_reports sets it)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value: under no difference each discordant image is a fair coin."""
    m, k = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)  # Python ints: exact until the one rounding division


def paired_difference(a: np.ndarray, b: np.ndarray, *, reps: int = 10_000,
                      seed: int = 0) -> PairedDifference:
    """A minus B on the same images; `a` and `b` are per-image booleans, in the same order."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty 1-d outcome arrays, got {a.shape} and "
                         f"{b.shape}")
    n = a.size
    cells = np.array([(a & b).sum(), (a & ~b).sum(), (~a & b).sum(), (~a & ~b).sum()])
    only_a, only_b = int(cells[1]), int(cells[2])
    d = (only_a - only_b) / n
    pa, pb = a.mean(), b.mean()
    # Resampling images with replacement is a multinomial draw of the four cells' counts.
    draws = np.random.default_rng(seed).multinomial(n, cells / n, size=reps)
    diffs = (draws[:, 1] - draws[:, 2]) / n
    return PairedDifference(
        n=n, accuracy_a=float(pa), accuracy_b=float(pb), difference=d, only_a=only_a,
        only_b=only_b, paired_se=math.sqrt(max((only_a + only_b) / n - d * d, 0.0) / n),
        unpaired_se=math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n),
        interval=interval(diffs) or [d, d], p_value=mcnemar_exact(only_a, only_b))


def measures(report: dict[str, Any]) -> dict[str, str]:
    """Every per-image outcome a report keeps, by name: `clean`, `worst-case`, and `aa:STAGE`
    for each attack stage of AutoAttack (`aa:apgd-ce`, `aa:apgd-t`, ... cumulative, in run
    order; its clean stage is the clean part's again)."""
    out: dict[str, str] = {}
    if (report.get("clean") or {}).get("correct") is not None:
        out["clean"] = report["clean"]["correct"]
    if (report.get("worst_case") or {}).get("correct") is not None:
        out["worst-case"] = report["worst_case"]["correct"]
    for stage, s in ((report.get("autoattack") or {}).get("correct_after") or {}).items():
        if stage != "clean":
            out[AA_PREFIX + stage] = s
    return out


def images_differ(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why two reports were not scored from the same split (None when they were: each report
    scores its n images after the first `start`, and the common ones are paired by number)."""
    sa, sb = a.get("settings", {}), b.get("settings", {})
    for key in ("data", "split"):
        if sa.get(key) != sb.get(key):
            return f"{key} differs: {sa.get(key)!r} against {sb.get(key)!r}"
    if sa.get("split") != "test":
        # the validation split is carved per checkpoint (its recorded size and seed), which
        # the report does not keep: the same settings need not mean the same images
        return "only reports on the test split can be paired"
    return None


def attack_settings_differ(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why two reports' attacked measures are not the same threat (None when they are)."""
    ea, eb = a.get("settings", {}).get("eps"), b.get("settings", {}).get("eps")
    return None if ea == eb else f"eps differs: {ea} against {eb}"


def compare_reports(a: dict[str, Any], b: dict[str, Any], *, reps: int = 10_000,
                    seed: int = 0, skip: int = 0, first: int | None = None,
                    ) -> tuple[dict[str, PairedDifference], list[str]]:
    """Every measure both reports keep, paired on the images both scored (by image number: a
    report of images 1,001-2,000 pairs with one of 1-2,000 on the second thousand), and notes
    on what was left out or cut (measures one report lacks, a shorter or shifted range).

    `skip` leaves out the first images of the split: a difference first seen on the first 1,000
    is checked on images that played no part in noticing it (reports of 5,000 against the
    headline's 1,000), where chance and the choice of what to look at cannot have flattered it.
    `first` keeps only the first images, so the same two reports also give the gap on those
    1,000."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if first is not None and first <= skip:
        raise ValueError(f"first must be more than skip ({skip}), got {first}")
    why = images_differ(a, b)
    if why:
        raise ValueError(f"not the same images: {why}")
    ma, mb = measures(a), measures(b)
    notes = [f"{name}: only in the {side} report" for side, mine, other in
             (("first", ma, mb), ("second", mb, ma)) for name in mine if name not in other]
    attack_why = attack_settings_differ(a, b)
    out: dict[str, PairedDifference] = {}
    sa, sb = _start(a), _start(b)
    for name in (k for k in ma if k in mb):
        if name != "clean" and attack_why:
            notes.append(f"{name}: left out, {attack_why}")
            continue
        xa, xb = unbits(ma[name]), unbits(mb[name])
        lo, m = max(sa, sb), min(sa + xa.size, sb + xb.size)
        if (sa, xa.size) != (sb, xb.size):
            notes.append(_range_note(name, lo, m, (sa, xa.size), (sb, xb.size)))
        if lo >= m:  # no image in common, which the range note just said
            continue
        if first is not None:
            m = min(m, first)
        lo = max(lo, skip)
        if lo >= m:
            notes.append(f"{name}: left out, {m} images scored and the first {skip} skipped"
                         if sa == sb == 0 else f"{name}: left out, no image left to pair")
            continue
        d = paired_difference(xa[lo - sa:m - sa], xb[lo - sb:m - sb], reps=reps, seed=seed)
        out[name] = replace(d, start=lo)
    return out, notes


def _start(report: dict[str, Any]) -> int:
    """Images of the split the report left out before its first (0 before `--start` existed)."""
    return int(report.get("settings", {}).get("start") or 0)


def _range_note(name: str, lo: int, hi: int, a: tuple[int, int], b: tuple[int, int]) -> str:
    if a[0] == b[0] == 0:
        return f"{name}: on the first {hi} images ({a[1]} and {b[1]} scored)"
    scored = " and ".join(image_range(s, k) for s, k in (a, b))
    if lo >= hi:
        return f"{name}: no image in common (images {scored} scored)"
    return f"{name}: on images {image_range(lo, hi - lo)} (images {scored} scored)"
