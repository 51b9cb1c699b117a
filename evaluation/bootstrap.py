"""Bootstrap resampling shared by every interval the evaluation reports (AUROC, risk-coverage).

A statistic is computed on groups of arrays: arrays of one group share their resampled indices
(paired: the same samples scored two ways), different groups are resampled independently (clean
and attacked inputs). Intervals are percentile intervals over `reps` resamples drawn from one
seeded generator, so a rerun gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

Group = Sequence[np.ndarray]


def resamples(groups: Sequence[Group], reps: int, seed: int) -> Iterator[list[list[np.ndarray]]]:
    """`reps` resamples of `groups`, with replacement; each group keeps its own size."""
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        out = []
        for arrays in groups:
            n = len(arrays[0])
            idx = rng.integers(0, n, n)
            out.append([np.asarray(a)[idx] for a in arrays])
        yield out


def interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> list[float] | None:
    """The percentile interval of bootstrap values, ignoring NaN (a resample where the statistic
    is undefined, e.g. no input answered); None when every value is NaN."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None
    tail = round(50 * (1 - level), 9)  # 2.5 for 95%, without float noise
    return np.percentile(v, [tail, 100 - tail]).tolist()


def bootstrap_many(statistic: Callable[..., dict[str, float]], groups: Sequence[Group], *,
                   reps: int = 1000, seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile 95% intervals of every value `statistic(*flattened arrays)` returns."""
    draws: dict[str, list[float]] = {}
    for sample in resamples(groups, reps, seed):
        for key, value in statistic(*[a for group in sample for a in group]).items():
            draws.setdefault(key, []).append(value)
    return {key: interval(values) for key, values in draws.items()}
