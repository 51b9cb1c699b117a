"""Reports of consecutive image ranges, scored by one `deqguard eval` line, as one report.

An attack line can outlast a session (APGD-CE + APGD-T on the wide DEQ: 92 minutes on the first
1,000 test images here). Split with `--start`/`--n` into ranges that each finish, the parts merge
into the report the whole line would have written: per-image outcomes in image order, accuracies
counted from them, times added, and the parts named in `merged_from`. Only what is kept per image
merges (the clean and AutoAttack parts, and their worst case); a PGD sweep, a detector or a
selective curve over a range is not the same thing computed on the union, so such reports are
refused rather than averaged.
"""

from __future__ import annotations

from itertools import pairwise

from .per_sample import unbits
from .schema import (
    AutoAttackSection,
    CleanResult,
    EarlierAutoAttack,
    EvalReport,
    MergedPart,
    WorstCase,
)

MERGEABLE_PARTS = frozenset({"clean", "aa"})
# every setting must match but the range itself
RANGE_SETTINGS = frozenset({"start", "n"})
# sections that hold no per-image outcomes: present in any part, the merge is refused
UNMERGEABLE = ("budget", "sweeps", "defense", "detection", "selective", "slowdown",
               "adaptive_selective", "rectifier")


def merge_reports(parts: list[EvalReport], names: list[str] | None = None) -> EvalReport:
    """One report of the union of `parts`' images (given in any order; `names`, e.g. their
    paths, are recorded beside each part's range)."""
    if len(parts) < 2:
        raise ValueError("give at least two reports to merge")
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    order = sorted(range(len(parts)), key=lambda i: parts[i].settings.start)
    parts, names = [parts[i] for i in order], [names[i] for i in order]
    _check_mergeable(parts, names)
    first = parts[0]
    n = sum(p.settings.n for p in parts)
    settings = first.settings.model_copy(update={"n": n})
    clean = _merge_clean([p.clean for p in parts]) if first.clean else None
    aa = _merge_autoattack([p.autoattack for p in parts]) if first.autoattack else None
    worst = _merge_worst([p.worst_case for p in parts]) if first.worst_case else None
    return first.model_copy(update={
        "created": max(p.created for p in parts),
        "seconds_total": sum(p.seconds_total for p in parts),
        "settings": settings, "clean": clean, "autoattack": aa, "worst_case": worst,
        "warnings": _union(w for p in parts for w in p.warnings),
        "merged_from": [MergedPart(report=name, start=p.settings.start, n=p.settings.n,
                                   created=p.created, seconds_total=p.seconds_total)
                        for name, p in zip(names, parts, strict=True)]})


def _check_mergeable(parts: list[EvalReport], names: list[str]) -> None:
    first = parts[0]
    extra = sorted(set(first.settings.parts) - MERGEABLE_PARTS)
    if extra:
        raise ValueError(f"{names[0]}: only the clean and aa parts merge (they keep per-image "
                         f"outcomes); it also ran {', '.join(extra)}")
    ref = first.settings.model_dump(exclude=set(RANGE_SETTINGS))
    for name, p in zip(names, parts, strict=True):
        if p.merged_from:
            raise ValueError(f"{name} is itself a merge: merge its parts in one go")
        other = p.settings.model_dump(exclude=set(RANGE_SETTINGS))
        differ = sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k))
        if differ:
            raise ValueError(f"{name} was not scored by the same line as {names[0]}: "
                             f"{', '.join(differ)} differ")
        if (p.checkpoint.sha256, p.deqguard_version) != (first.checkpoint.sha256,
                                                         first.deqguard_version):
            raise ValueError(f"{name}: another checkpoint or deqguard version than {names[0]}")
        held = [s for s in UNMERGEABLE if getattr(p, s) is not None] + (
            ["attacks"] if p.attacks else [])
        if held:
            raise ValueError(f"{name} holds {', '.join(held)}, which keep no per-image outcomes")
        aa = p.autoattack
        if aa is not None and (aa.n != p.settings.n or aa.correct_after is None):
            raise ValueError(f"{name}: AutoAttack scored {aa.n} of its {p.settings.n} images "
                             "(--aa-n) or kept no per-image outcomes; its images are not one range")
    for (na, a), (nb, b) in pairwise(zip(names, parts, strict=True)):
        end = a.settings.start + a.settings.n
        if b.settings.start != end:
            raise ValueError(f"{na} scores images {a.settings.images} and {nb} "
                             f"starts at image {b.settings.start + 1}: the ranges must follow "
                             "one another without gap or overlap")


def _accuracy(correct: str) -> float:
    return float(unbits(correct).mean())


def _weighted(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def _merge_clean(parts: list[CleanResult | None]) -> CleanResult:
    if any(p is None or p.correct is None for p in parts):
        raise ValueError("a part has no per-image clean outcomes")
    ns = [p.n for p in parts]
    correct = "".join(p.correct for p in parts)
    undefended = _weighted([p.accuracy_undefended for p in parts], ns)
    per_sample = _weighted([p.seconds_per_sample for p in parts], ns)
    per_sample_undefended = _weighted([p.seconds_per_sample_undefended for p in parts], ns)
    return CleanResult(
        n=sum(ns), accuracy=_accuracy(correct), accuracy_undefended=undefended,
        converged_fraction=_weighted([p.converged_fraction for p in parts], ns),
        mean_iterations=_weighted([p.mean_iterations for p in parts], ns),
        seconds_per_sample=per_sample, seconds_per_sample_undefended=per_sample_undefended,
        overhead_ratio=per_sample / per_sample_undefended if per_sample_undefended else 1.0,
        correct=correct)


def _merge_autoattack(parts: list[AutoAttackSection | None]) -> AutoAttackSection:
    first = parts[0]
    same = ("version", "attacks", "forward", "gradient", "eps")
    for p in parts:
        if p is None or any(getattr(p, k) != getattr(first, k) for k in same) or (
                list(p.correct_after or {}) != list(first.correct_after or {})):
            raise ValueError("the parts' AutoAttack runs differ (attacks, stages or gradient)")
    after = {stage: "".join(p.correct_after[stage] for p in parts)  # type: ignore[index]
             for stage in first.correct_after or {}}
    accuracy_after = {stage: _accuracy(s) for stage, s in after.items()}
    seconds: dict[str, float] = {}
    for p in parts:
        for stage, s in p.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + s
    return first.model_copy(update={
        "n": sum(p.n for p in parts), "accuracy": list(accuracy_after.values())[-1],
        "accuracy_after": accuracy_after, "correct_after": after, "seconds": seconds,
        "warnings": _union(w for p in parts for w in p.warnings),
        "earlier": _merge_earlier(parts)})


def _merge_earlier(parts: list[AutoAttackSection]) -> EarlierAutoAttack | None:
    """Parts that continued an earlier report (`--aa-from`) continued the same one, or none did."""
    earlier = [p.earlier for p in parts if p.earlier is not None]
    if not earlier:
        return None
    if len(earlier) < len(parts):
        raise ValueError("some parts continued an earlier AutoAttack report (--aa-from) and "
                         "some did not")
    first = earlier[0]
    if any((e.report, e.stages) != (first.report, first.stages) for e in earlier):
        raise ValueError("the parts continued different earlier AutoAttack reports")
    return first.model_copy(update={"clean_differs": sum(e.clean_differs for e in earlier)})


def _merge_worst(parts: list[WorstCase | None]) -> WorstCase:
    first = parts[0]
    if any(p is None or p.correct is None or p.attacks != first.attacks for p in parts):
        raise ValueError("the parts' worst cases combine other attacks or keep no per-image "
                         "outcomes")
    correct = "".join(p.correct for p in parts)  # type: ignore[misc]
    return WorstCase(accuracy=_accuracy(correct), attacks=first.attacks,
                     n=sum(p.n for p in parts), correct=correct)  # type: ignore[union-attr]


def _union(items) -> list[str]:
    return list(dict.fromkeys(items))
