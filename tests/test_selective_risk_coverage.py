"""Risk-coverage (evaluation/risk_coverage.py) on hand-made examples with known answers,
and the per-kind summary with its bootstrap intervals (evaluation/selective.py)."""

from __future__ import annotations

import numpy as np
import pytest

from deqguard.evaluation.bootstrap import bootstrap_many
from deqguard.evaluation.risk_coverage import answered_stats, aurc, risk_coverage
from deqguard.evaluation.selective import Scored, judge_kind


def test_curve_and_area_by_hand():
    doubt = np.array([0.4, 0.1, 0.3, 0.2])  # sorted: 0.1 ok, 0.2 ok, 0.3 wrong, 0.4 ok
    correct = np.array([True, True, False, True])
    cov, acc = risk_coverage(doubt, correct)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 1.0, 2 / 3, 0.75])
    # mean selective risk over k = 1..4: (0 + 0 + 1/3 + 1/4) / 4
    assert aurc(doubt, correct) == pytest.approx(7 / 48)


def test_ties_spread_their_errors_evenly():
    """A constant score knows nothing: accuracy is the plain one at every coverage, whatever
    order the sort leaves the tied inputs in."""
    correct = np.array([False, True, True, False, True])
    cov, acc = risk_coverage(np.zeros(5), correct)
    np.testing.assert_allclose(acc, np.full(5, 0.6))
    assert aurc(np.zeros(5), correct) == pytest.approx(0.4)
    # one tie group inside: [0.1] ok, then [0.5, 0.5] one wrong, then [0.9] wrong
    doubt = np.array([0.5, 0.1, 0.9, 0.5])
    correct = np.array([True, True, False, False])
    _, acc = risk_coverage(doubt, correct)
    np.testing.assert_allclose(acc, [1.0, 1 - 0.5 / 2, 1 - 1 / 3, 0.5])


def test_a_perfect_score_beats_a_reversed_one():
    correct = np.array([True] * 6 + [False] * 4)
    perfect = np.where(correct, 0.0, 1.0) + np.arange(10) * 1e-3
    assert aurc(perfect, correct) < aurc(-perfect, correct)
    _, acc = risk_coverage(perfect, correct)
    assert (acc[:6] == 1.0).all()


def test_answered_numbers_at_a_threshold_by_hand():
    doubt = np.array([0.1, 0.2, 0.5, 0.6, 0.9])  # 0.5 sits on the threshold: answered
    correct = np.array([True, False, True, False, False])
    successful = np.array([False, True, False, True, True])
    out = answered_stats(doubt, correct, 0.5, successful)
    assert out == {"coverage": 0.6, "accuracy_answered": pytest.approx(2 / 3),
                   "successful_answered": pytest.approx(1 / 3)}
    nothing = answered_stats(doubt, correct, 0.0)
    assert nothing["coverage"] == 0.0 and np.isnan(nothing["accuracy_answered"])


def test_bootstrap_intervals_are_seeded_and_cover_the_estimate():
    rng = np.random.default_rng(0)
    doubt, correct = rng.normal(size=300), rng.random(300) < 0.7

    def stat(d, c):
        return {"aurc": aurc(d, c)}

    a = bootstrap_many(stat, [(doubt, correct)], reps=200, seed=3)
    b = bootstrap_many(stat, [(doubt, correct)], reps=200, seed=3)
    assert a == b
    lo, hi = a["aurc"]
    assert lo < aurc(doubt, correct) < hi


def test_judge_kind_names_the_best_score_and_counts_successful_attacks():
    y = np.array([0, 1, 2, 3, 0, 1])
    pred = np.array([0, 1, 0, 0, 0, 1])  # inputs 2 and 3 wrong
    good = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.4])  # doubts the wrong ones most
    bad = 1.0 - good  # doubts the right ones most
    scored = Scored({"good": good, "bad": bad}, pred)
    clean_ok = np.array([True, True, True, False, True, True])
    kind = judge_kind("pgd", scored, y, {"good": 0.5, "bad": 0.5}, clean_correct=clean_ok,
                      reps=50, seed=0)
    assert kind.n_successful == 1 and kind.accuracy == pytest.approx(4 / 6)
    g, b = kind.scores["good"], kind.scores["bad"]
    assert g.accuracy_answered == 1.0 and g.successful_answered == 0.0
    assert b.accuracy_answered == 0.0 and b.successful_answered == 1.0
    assert kind.best == "good" and g.aurc < b.aurc
    assert g.curve.coverage[-1] == 1.0 and len(g.curve.accuracy) == 6
    assert g.accuracy_answered_ci is not None and g.aurc_ci is not None
