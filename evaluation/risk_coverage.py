"""Risk-coverage of a doubt score: how accurate the answers are when only the surest are given.

Answering the k inputs of least doubt (k = 1..n) gives coverage k/n and selective risk
errors(k)/k; accuracy among answered inputs is 1 - risk. The area under the risk-coverage curve
(AURC, Geifman et al. 2019) is the mean selective risk over k = 1..n: lower is better, and a
score that orders every error after every correct answer reaches the minimum. AUGRC (Traub et
al. 2024) averages the generalized risk errors(k)/n instead: wrong answers per input seen.

Tied doubt scores have no order, so within a tie group the errors are spread evenly (the
expectation over every order of the group): a constant score then gives the plain error rate at
every coverage, not a number that depends on how the sort broke the ties.
"""

from __future__ import annotations

import numpy as np


def _arrays(doubt: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(doubt, dtype=np.float64).ravel()
    c = np.asarray(correct, dtype=bool).ravel()
    if d.shape != c.shape:
        raise ValueError(f"{d.size} doubt scores for {c.size} correctness flags")
    if d.size == 0:
        raise ValueError("no inputs")
    if not np.isfinite(d).all():
        raise ValueError("non-finite doubt scores")
    return d, c


def risk_coverage(doubt: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [n], accuracy among answered [n]) answering the k least doubtful, k = 1..n."""
    d, c = _arrays(doubt, correct)
    order = np.argsort(d, kind="mergesort")
    d, wrong = d[order], (~c[order]).astype(np.float64)
    _, start, counts = np.unique(d, return_index=True, return_counts=True)
    group = np.repeat(np.arange(start.size), counts)
    group_errors = np.add.reduceat(wrong, start)
    before = np.concatenate([[0.0], np.cumsum(group_errors)[:-1]])
    k = np.arange(1, d.size + 1)
    inside = k - start[group]  # answered so far within the sample's tie group
    errors = before[group] + inside * group_errors[group] / counts[group]
    return k / d.size, 1.0 - errors / k


def aurc(doubt: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean selective risk over k = 1..n."""
    _, acc = risk_coverage(doubt, correct)
    return float(np.mean(1.0 - acc))


def augrc(doubt: np.ndarray, correct: np.ndarray) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024): the mean over
    k = 1..n of errors(k) / n, the share of all inputs answered wrongly.

    Selective risk divides by the answered only, so AURC rewards a score for answering few;
    the generalized risk counts every wrong answer given against the whole set, the harm a
    caller meets. A constant score gives about half the error rate, a perfect one
    e^2 / 2 for error rate e (errors only at the top coverages).
    """
    cov, acc = risk_coverage(doubt, correct)
    return float(np.mean(cov * (1.0 - acc)))


def answered_stats(doubt: np.ndarray, correct: np.ndarray, threshold: float,
                   successful: np.ndarray | None = None) -> dict[str, float]:
    """At a fixed threshold (answer when doubt <= threshold): the share answered, accuracy
    among the answered (NaN if none), and with `successful` (the attacks that flipped a correct
    clean answer) the share of those that are answered: errors the caller would act on."""
    d = np.asarray(doubt, dtype=np.float64).ravel()
    c = np.asarray(correct, dtype=bool).ravel()
    ans = d <= threshold
    out = {"coverage": float(ans.mean()) if ans.size else float("nan"),
           "accuracy_answered": float(c[ans].mean()) if ans.any() else float("nan")}
    if successful is not None:
        s = np.asarray(successful, dtype=bool).ravel()
        out["successful_answered"] = float(ans[s].mean()) if s.any() else float("nan")
    return out


def downsample(coverage: np.ndarray, accuracy: np.ndarray, points: int = 101
               ) -> tuple[list[float], list[float]]:
    """At most `points` points of a curve (both ends kept), for the JSON and the plots."""
    if coverage.size > points:
        idx = np.unique(np.linspace(0, coverage.size - 1, points).round().astype(int))
        coverage, accuracy = coverage[idx], accuracy[idx]
    return coverage.tolist(), accuracy.tolist()
