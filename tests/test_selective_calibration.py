"""Selective calibration (models/selective.py): thresholds that answer the asked share of the
calibration scores, interpolation between stored coverages, and the stored block's checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import env_seed

from deqguard.models import CheckpointError
from deqguard.models.selective import (
    SelectiveCalibration,
    calibrate,
    coverage_threshold,
    selective_from_metadata,
)

COVERAGES = (0.05, 0.1, 0.33, 0.5, 0.77, 0.9, 0.95, 0.98, 0.999, 1.0)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 2001])
@pytest.mark.parametrize("dist", ["normal", "exponential", "uniform"])
def test_thresholds_answer_the_asked_coverage_within_one_over_n(n, dist):
    rng = np.random.default_rng(env_seed() * 1000 + n)
    scores = getattr(rng, dist)(size=n)
    for c in COVERAGES:
        t, realised = coverage_threshold(scores, c)
        answered = float(np.mean(scores <= t))
        assert realised == answered  # the reported coverage is the real one
        assert abs(answered - c) <= 1 / n + 1e-12, (c, answered)


def test_ties_take_the_threshold_closer_to_the_asked_coverage():
    """Integer scores (iterations): the realised share is reported, and of the two thresholds
    around the tie the one closer to the asked coverage is kept."""
    scores = np.array([1] * 10 + [2] * 80 + [3] * 10, dtype=float)
    t, realised = coverage_threshold(scores, 0.2)  # 2 answers 90%, 1 answers 10%
    assert (t, realised) == (1.0, 0.1)
    t, realised = coverage_threshold(scores, 0.6)  # 90% is 0.3 away, 10% 0.5 away
    assert (t, realised) == (2.0, 0.9)
    assert coverage_threshold(scores, 1.0) == (3.0, 1.0)


def test_calibration_stores_every_coverage_and_one():
    rng = np.random.default_rng(env_seed())
    scores = rng.normal(size=500)
    cal = calibrate(scores, "mean_entropy", (0.9, 0.5), model_sha256="abc",
                    solve={"solver": "anderson", "max_iter": 30, "tol": 1e-3})
    assert cal.coverages == [0.5, 0.9, 1.0] and cal.n_calibration == 500
    assert cal.thresholds == sorted(cal.thresholds) and cal.thresholds[-1] == scores.max()
    for c, t, r in zip(cal.coverages, cal.thresholds, cal.realised, strict=True):
        assert np.mean(scores <= t) == r and abs(r - c) <= 1 / 500
    back = SelectiveCalibration.model_validate(cal.model_dump(mode="json"))
    assert back == cal


def test_interpolation_between_stored_coverages():
    cal = SelectiveCalibration(score="max_softmax", coverages=[0.5, 0.8, 1.0],
                               thresholds=[1.0, 2.5, 3.0], realised=[0.5, 0.8, 1.0],
                               n_calibration=10)
    assert cal.threshold(0.5) == 1.0 and cal.threshold(0.8) == 2.5
    assert cal.threshold(0.65) == pytest.approx(1.75)  # halfway between 0.5 and 0.8
    assert cal.threshold(0.9) == pytest.approx(2.75)
    assert cal.threshold(1.0) is None  # coverage 1: answer everything
    with pytest.raises(ValueError, match="below the lowest calibrated coverage 0.5"):
        cal.threshold(0.3)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"coverage must be a number in \(0, 1\]"):
            cal.threshold(bad)


def test_interpolated_thresholds_answer_between_their_neighbours():
    """On generated scores, a coverage between two stored ones answers a share between theirs."""
    rng = np.random.default_rng(env_seed() + 1)
    scores = rng.gamma(2.0, size=3000)
    cal = calibrate(scores, "final_entropy", (0.5, 0.6, 0.7, 0.8, 0.9, 0.95))
    for c in (0.55, 0.63, 0.75, 0.88, 0.93, 0.97, 0.999):
        answered = np.mean(scores <= cal.threshold(c))
        i = int(np.searchsorted(cal.coverages, c)) - 1
        assert cal.realised[i] <= answered <= cal.realised[i + 1]
        if c < 0.95:  # inside the grid a smooth score lands close to the asked coverage too;
            assert abs(answered - c) < 0.02  # towards 1 the last segment ends at the maximum



@pytest.mark.parametrize("change, message", [
    ({"thresholds": [2.0, 1.0, 3.0]}, "must not decrease"),
    ({"coverages": [0.5, 0.8, 0.9]}, "end at 1.0"),
    ({"coverages": [0.8, 0.5, 1.0]}, "strictly increasing"),
    ({"realised": [0.5]}, "at least two coverages"),
    ({"thresholds": [1.0, float("inf"), 3.0]}, "non-finite"),
    ({"score": "logistic"}, "score"),
    ({"version": 2}, "version 2"),
])
def test_invalid_blocks_are_refused(change, message):
    good = {"score": "max_softmax", "coverages": [0.5, 0.8, 1.0], "thresholds": [1.0, 2.0, 3.0],
            "realised": [0.5, 0.8, 1.0], "n_calibration": 10, "model_sha256": "abc"}
    SelectiveCalibration.model_validate(good)
    meta = {"sha256": "abc", "selective": {**good, **change}}
    with pytest.raises(CheckpointError, match=message):
        selective_from_metadata(meta)


def test_metadata_lookup_refuses_other_weights_and_ignores_old_checkpoints():
    block = calibrate(np.arange(10.0), "iterations", (0.5,), model_sha256="abc").model_dump(
        mode="json")
    assert selective_from_metadata({"sha256": "abc", "selective": block}).score == "iterations"
    assert selective_from_metadata({"sha256": "abc"}) is None
    with pytest.raises(CheckpointError, match="other weights"):
        selective_from_metadata({"sha256": "def", "selective": block})


def test_a_detector_score_calibration_holds_for_its_detector_only():
    """Refitting the learned detector changes its score's scale: the old thresholds are refused."""
    from selective_ckpt import cheap_detector

    det = cheap_detector("abc")
    block = calibrate(np.arange(10.0), "detector", (0.5,), model_sha256="abc",
                      detector=det).model_dump(mode="json")
    meta = {"sha256": "abc", "detector": det.model_dump(mode="json"), "selective": block}
    assert selective_from_metadata(meta).detector_fingerprint
    refit = det.model_copy(update={"intercept": 1.0}).model_dump(mode="json")
    with pytest.raises(CheckpointError, match="another learned detector"):
        selective_from_metadata({**meta, "detector": refit})
    with pytest.raises(CheckpointError, match="has no learned detector"):
        selective_from_metadata({"sha256": "abc", "selective": block})
    with pytest.raises(ValueError, match="needs the detector"):
        calibrate(np.arange(10.0), "detector")
