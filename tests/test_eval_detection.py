"""Detection scores, the AUROC helper and threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqguard.models import SolveResult
from deqguard.models.detection_scores import (
    DetectionCalibration,
    auroc,
    calibrate_threshold,
    detection_score,
    flag,
    roc_curve,
    tpr_at_fpr,
)


def test_auroc_matches_hand_computed_case():
    # neg = {0, 1, 2}, pos = {1, 3}. pos 1 vs neg 0: win, vs 1: tie (0.5), vs 2: loss;
    # pos 3 wins all three -> (1.5 + 3) / 6
    assert auroc([0, 1, 2], [1, 3]) == pytest.approx(4.5 / 6)
    assert auroc([0, 1], [2, 3]) == 1.0
    assert auroc([2, 3], [0, 1]) == 0.0
    fpr, tpr, thr = roc_curve([0, 1], [1, 2])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert thr[0] == np.inf


def test_auroc_agrees_with_pairwise_definition():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=57).round(1), (rng.normal(size=43) + 0.7).round(1)
    diff = pos[:, None] - neg[None, :]
    expected = (diff > 0).mean() + 0.5 * (diff == 0).mean()
    assert auroc(neg, pos) == pytest.approx(expected)


@pytest.mark.parametrize("fpr", [0.05, 0.1, 0.01])
def test_calibrated_threshold_gives_asked_fpr(fpr):
    clean = np.random.default_rng(1).normal(size=400)
    t = calibrate_threshold(clean, fpr)
    assert np.mean(clean > t) == pytest.approx(fpr, abs=1e-9)
    tpr, t2 = tpr_at_fpr(clean, clean + 10, fpr)
    assert t2 == t and tpr == 1.0


def _result() -> SolveResult:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    entropy = torch.tensor([[1.0, 1.1], [0.5, 0.9], [0.1, 0.9]])
    residual = torch.tensor([[1.0, 1.0], [0.1, 0.5], [1e-4, 0.3]])
    return SolveResult(logits=logits, residual=residual, iterations=torch.tensor([3, 3]),
                       converged=torch.tensor([True, False]), entropy=entropy)


def test_scores_rank_the_unsettled_sample_higher():
    r = _result()
    for name in ["final_entropy", "max_softmax", "mean_entropy", "early_entropy",
                 "final_residual"]:
        s = detection_score(r, name)
        assert s.shape == (2,) and s[1] > s[0], name
    torch.testing.assert_close(detection_score(r, "mean_entropy"), torch.tensor([0.5333, 0.9667]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(detection_score(r, "early_entropy", early_index=0),
                               torch.tensor([1.0, 1.1]))
    with pytest.raises(ValueError):
        detection_score(r, "nope")


def test_mean_entropy_uses_each_samples_own_iterates():
    r = _result()
    r.iterations = torch.tensor([1, 2])  # rows after a sample's stop repeat (here: do not count)
    torch.testing.assert_close(detection_score(r, "mean_entropy"), torch.tensor([1.0, 1.0]))


def test_flag_applies_stored_calibration():
    r = _result()
    cal = DetectionCalibration(score="mean_entropy", threshold=0.7, fpr=0.05)
    score, suspicious = flag(r, cal.model_dump())
    assert suspicious.tolist() == [False, True]
    params = {"length": 2, "weights": [1, 0, 0, 0], "bias": 0.0, "mean": [0] * 4, "std": [1] * 4}
    s = detection_score(r, "logistic", params=params)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.1]))
