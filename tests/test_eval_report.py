"""The eval report as people read it: report.md explains an all-n/a detection table, and drawing
the plots prints no matplotlib warnings."""

from __future__ import annotations

import warnings

import pytest

from deqguard.evaluation.report import render_markdown, write_report
from deqguard.evaluation.schema import (
    CheckpointInfo,
    Curve,
    DetectionAttack,
    DetectionSection,
    EvalReport,
    EvalSettings,
    ScoreResult,
    Trajectory,
)

SCORES = ["max_softmax", "mean_entropy"]


def _attack(name: str, successful: int, n: int = 16) -> DetectionAttack:
    """One attack's detection row; with no success its AUROCs are None, as detect_attack makes
    them, and it has no ROC curve to draw."""
    auroc = 0.8 if successful else None
    return DetectionAttack(
        attack=name, n_successful=successful, n_all=n,
        scores={s: ScoreResult(auroc=auroc, tpr_at_fpr=0.5 if successful else None,
                               auroc_all=0.6) for s in SCORES},
        roc={s: Curve(fpr=[0.0, 0.5, 1.0], tpr=[0.0, 0.9, 1.0]) for s in SCORES}
        if successful else {})


def _report(attacks: list[DetectionAttack]) -> EvalReport:
    flat = [0.5, 0.4, 0.4]
    trajectory = Trajectory(label="clean", n=16, entropy_mean=flat, entropy_q25=flat,
                            entropy_q75=flat, residual_median=flat)
    det = DetectionSection(scores=SCORES, early_index=1, fpr=0.05, attacks=attacks,
                           trajectories=[trajectory])
    settings = EvalSettings(checkpoint="tiny.safetensors", data="fashion-mnist", n=16, eps=0.1,
                            parts=["clean", "detect"])
    return EvalReport(deqguard_version="test", created="2026-01-01T00:00:00+00:00",
                      seconds_total=1.0, settings=settings, detection=det,
                      checkpoint=CheckpointInfo(path="tiny.safetensors", is_deq=True))


def _detection_table(md: str) -> str:
    return md.split("## Detection from the trajectory", 1)[1]


@pytest.mark.parametrize("attacks, words", [
    ([_attack("pgd2-exact", 0), _attack("detector-adaptive-lam0.1", 0)],
     "none of the 32 attacked inputs turned a right answer wrong"),
    ([], "no attack ran"),
])
def test_an_all_na_detection_table_says_why(attacks, words):
    table = _detection_table(render_markdown(_report(attacks), []))
    assert "n/a" in table or not attacks
    assert words in table


def test_a_table_with_aurocs_has_no_na_explanation():
    md = render_markdown(_report([_attack("pgd2-exact", 3), _attack("pgd2-phantom", 0)]), [])
    assert "0.80" in _detection_table(md) and "every AUROC is n/a" not in md.lower()


def test_plots_print_no_matplotlib_warning(tmp_path, capsys):
    """No attack succeeded: the ROC panels have no curve, and an empty legend used to warn."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        md = write_report(_report([_attack("pgd2-exact", 0)]), tmp_path / "report")
    assert [str(w.message) for w in seen] == []
    assert capsys.readouterr().err == ""
    assert (md.parent / "roc.png").stat().st_size > 0
    assert (md.parent / "entropy_trajectory.png").stat().st_size > 0
