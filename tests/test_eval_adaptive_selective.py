"""The attack aimed at a wrong answer that a doubt score lets through, its report, and the
`deqguard eval --attacks adaptive-selective` part end to end on the fixture checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_pattern_images
from headed import headed_model
from selective_ckpt import calibrated_copy, cheap_detector

from deqguard.cli import main
from deqguard.evaluation.adaptive_selective import (
    best_scores,
    row_numbers,
    score_stats,
    usable_scores,
)
from deqguard.evaluation.adaptive_selective_schema import AdaptiveSelectiveRow
from deqguard.evaluation.risk_coverage import augrc
from deqguard.evaluation.schema import EvalReport
from deqguard.evaluation.selective_attack import (
    Best,
    Goal,
    apgd_checkpoints,
    judge,
    selective_attack,
    surrogate_forward,
)
from deqguard.models import read_metadata
from deqguard.models.selective import doubt_score, selective_from_metadata
from deqguard.training.attacks import pgd_ce

EPS = 0.3


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_pattern_images(n, seed=11)
    return torch.from_numpy(x), torch.from_numpy(y)


# -- the attack ------------------------------------------------------------------------------

# tau far below every score: nothing is ever answered, so on an input already answered wrongly
# the objective is the score's own margin, and what the attack can do is lower the score
@pytest.mark.parametrize("name, tau", [("max_softmax", 1e-6), ("final_entropy", 1e-6),
                                       ("mean_entropy", 1e-6), ("iterations", 2.0),
                                       ("detector", -50.0)])
def test_the_attack_lowers_the_targeted_score_and_stays_in_the_ball(tiny_model, name, tau):
    _lowers_the_score(tiny_model, name, tau)


def _headed(checkpoint, trajectory: int = 0) -> torch.nn.Module:
    """The fixture network with a fresh rectifier head (its A is some function of z* and, with
    `trajectory`, of the path: enough for the attack to have a score to lower)."""
    return headed_model(checkpoint, {"hidden": 16, "trajectory": trajectory})


def test_the_attack_lowers_the_rectified_score_of_a_headed_model(tiny_checkpoint):
    _lowers_the_score(_headed(tiny_checkpoint), "rectified", 1e-6)


def test_the_rectified_goal_differentiates_the_trajectory_the_head_reads(tiny_checkpoint):
    """The attack aimed at the served rectified score reaches A through the head's path inputs
    too, not through the state alone (those inputs are recorded without a graph when served)."""
    from deqguard.models.rectifier import rectified_doubt

    model = _headed(tiny_checkpoint, trajectory=3)
    x = _batch()[0].requires_grad_(True)
    fwd = surrogate_forward(model, x, Goal("rectified", 0.5))
    (full,) = torch.autograd.grad(fwd.accept_margin.sum(), x)
    eq = model.equilibrium(x, grad="exact", keep_states=True)
    held = model.rectifier(eq.z, model.graph_trajectory_features(eq, 3).detach())
    s = rectified_doubt(model.decode(eq.z), held)
    (state_only,) = torch.autograd.grad(-torch.log(s.clamp_min(1e-12)).sum(), x)
    assert torch.allclose(fwd.score, s.detach(), atol=1e-5)
    assert not torch.allclose(full, state_only, atol=1e-6)


def test_the_rectified_score_is_skipped_without_a_head(tiny_model, tiny_checkpoint):
    keep, skipped = usable_scores(tiny_model, ["max_softmax", "rectified"], None)
    assert keep == ["max_softmax"] and skipped[0].startswith("rectified:")
    keep, _ = usable_scores(_headed(tiny_checkpoint), ["rectified"], None)
    assert keep == ["rectified"]


def _lowers_the_score(tiny_model, name: str, tau: float) -> None:
    x, y = _batch()
    detector = cheap_detector("") if name == "detector" else None
    goal = Goal(name, tau, detector)
    # wrong answers to start from: PGD at a large radius
    gen = torch.Generator().manual_seed(0)
    x_wrong = pgd_ce(tiny_model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=gen)
    tier, progress = judge(tiny_model, x_wrong, y, goal)
    wrong = tier == 1
    assert wrong.sum() >= 2 and (tier < 2).all()

    def margin(xa: torch.Tensor) -> torch.Tensor:  # > 0 iff answered; higher = lower score
        with torch.enable_grad():
            return surrogate_forward(tiny_model, xa.requires_grad_(True), goal
                                     ).accept_margin.detach()

    before = margin(x_wrong.clone())
    best = Best(x_wrong.clone(), tier, progress, torch.full_like(tier, -1))
    out = selective_attack(tiny_model, x, y, goal, eps=EPS, iters=8, restarts=1, targets=0,
                           seed=3, best=best).x
    assert (out - x).abs().max() <= EPS + 1e-6 and out.min() >= 0 and out.max() <= 1
    after = margin(out.clone())
    with torch.no_grad():
        still_wrong = tiny_model(out).argmax(1) != y
    assert still_wrong[wrong].all()  # kept wrong: a lower tier never replaces a higher one
    assert (after[wrong] >= before[wrong] - 1e-4).all()
    assert after[wrong].mean() > before[wrong].mean() + 1e-3
    if name != "iterations":  # the surrogate is the score itself: the real score fell too
        with torch.no_grad():
            r0 = tiny_model.solve(x_wrong, features=detector.dynamics if detector else None)
            r1 = tiny_model.solve(out, features=detector.dynamics if detector else None)
        s0, s1 = doubt_score(r0, name, detector), doubt_score(r1, name, detector)
        assert s1[wrong].mean() < s0[wrong].mean()


def test_from_random_starts_every_point_stays_in_the_ball_and_the_pixel_range(tiny_model):
    x, y = _batch(6)
    best = selective_attack(tiny_model, x, y, Goal("max_softmax", 0.3), eps=0.1, iters=3,
                            restarts=1, targets=2, seed=0)
    assert (best.x - x).abs().max() <= 0.1 + 1e-6
    assert best.x.min() >= 0 and best.x.max() <= 1 and (best.tier >= 0).all()
    with torch.no_grad():
        r = tiny_model.solve(best.x)
    wrong = r.logits.argmax(1) != y
    answered = doubt_score(r, "max_softmax") <= 0.3
    # the tiers the search recorded are the real pipeline's verdicts on the points it kept
    assert torch.equal(best.tier, wrong.long() * (1 + answered.long()))


def test_apgd_checkpoints_follow_the_published_schedule():
    # 100 iterations: 22, then steps of 19, 16, 13, 10, 7, 6, 6, ...
    assert apgd_checkpoints(100)[:6] == [22, 41, 57, 70, 80, 87]
    assert all(b - a >= 6 for a, b in zip(apgd_checkpoints(100), apgd_checkpoints(100)[1:],
                                           strict=False))


# -- the report's numbers ---------------------------------------------------------------------

def test_report_numbers_on_a_hand_made_example():
    clean_doubt = np.array([0.1, 0.2, 0.3, 0.4])
    clean_ok = np.array([True, True, False, True])
    adv_doubt = np.array([0.05, 0.5, 0.2, 0.1])
    adv_ok = np.array([False, False, False, True])
    s = score_stats(clean_doubt, clean_ok, adv_doubt, adv_ok, 0.25)
    assert s["clean_coverage"] == 0.5 and s["clean_accuracy_answered"] == 1.0
    assert s["attack_error_rate"] == 0.75
    assert s["attacked_coverage"] == 0.75
    assert s["attacked_accuracy_answered"] == pytest.approx(1 / 3)
    assert s["successful_answered"] == 0.5  # images 0 and 1 flipped; 0 is answered
    assert s["wrong_answered"] == 0.5  # images 0 and 2
    # risks at k = 1..4: clean 0, 0, 1/3, 1/4; attacked 1, 1/2, 2/3, 3/4
    assert s["aurc_clean"] == pytest.approx((1 / 3 + 1 / 4) / 4)
    assert s["aurc_attacked"] == pytest.approx((1 + 1 / 2 + 2 / 3 + 3 / 4) / 4)
    # generalized risk errors(k) / n: clean 0, 0, 1/4, 1/4; attacked 1/4, 1/4, 2/4, 3/4
    assert s["augrc_clean"] == pytest.approx(0.5 / 4)
    assert s["augrc_attacked"] == pytest.approx(1.75 / 4)
    r = row_numbers(clean_doubt, clean_ok, adv_doubt, adv_ok, 0.25, reps=200, seed=0)
    assert r["n_successful"] == 2 and r["attack_error_rate"] == 0.75
    lo, hi = r["attack_error_rate_ci"]
    assert 0 <= lo <= hi <= 1 and r["aurc_attacked_ci"] is not None


def test_augrc_spreads_tied_errors_evenly():
    # one error among four tied scores: errors(k) = k / 4, so GR = k / 16 and the mean 10 / 64
    assert augrc(np.zeros(4), np.array([True, False, True, True])) == pytest.approx(10 / 64)
    # a perfect order puts the error last: GR = 0, 0, 0, 1/4
    assert augrc(np.array([0, 1, 2, 3.0]), np.array([True, True, True, False])) == (
        pytest.approx(1 / 16))


def test_nothing_answered_and_no_success_are_undefined_not_zero():
    s = score_stats(np.ones(3), np.ones(3, bool), np.ones(3), np.ones(3, bool), 0.5)
    assert np.isnan(s["clean_accuracy_answered"]) and np.isnan(s["successful_answered"])
    assert s["wrong_answered"] == 0.0


def _row(score: str, coverage: float, acc: float | None, wrong: float) -> AdaptiveSelectiveRow:
    return AdaptiveSelectiveRow(
        score=score, coverage=coverage, threshold=0.1, threshold_source="validation",
        attack={}, clean_coverage=0.9, attack_error_rate=0.3, pgd_error_rate=0.2,
        weaker_than_pgd=False, attacked_coverage=0.5, attacked_accuracy_answered=acc,
        n_successful=3, wrong_answered=wrong, aurc_clean=0.1, augrc_clean=0.1,
        aurc_attacked=0.2, augrc_attacked=0.2, seconds=0.0)


def test_best_score_is_the_most_accurate_among_answered_then_fewest_wrong_answers():
    rows = [_row("a", 0.8, 0.9, 0.05), _row("b", 0.8, 0.9, 0.02), _row("c", 0.8, None, 0.0),
            _row("a", 0.9, 0.95, 0.04), _row("b", 0.9, 0.7, 0.01)]
    assert best_scores(rows) == {"0.8": "b", "0.9": "a"}


# -- the CLI part -----------------------------------------------------------------------------

def _fast(data_dir) -> list[str]:
    return ["--data", "fashion-mnist", "--data-dir", str(data_dir), "--n", "10",
            "--val-n", "40", "--val-size", "100", "--batch-size", "10", "--no-progress",
            "--threads", "1", "--selective-pgd-steps", "2", "--iters", "3", "--targets", "1",
            "--reps", "50"]


def test_cli_part_end_to_end(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys):
    ckpt = calibrated_copy(tiny_checkpoint, tmp_path / "tiny.safetensors", "max_softmax")
    out, rep, cache = tmp_path / "as.json", tmp_path / "report", tmp_path / "cache"
    args = ["eval", str(ckpt), "--attacks", "clean,adaptive-selective",
            "--adaptive-scores", "max_softmax,iterations,detector", "--json", str(out),
            "--report", str(rep), "--selective-cache", str(cache), *_fast(pattern_idx_dir)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    sec = EvalReport.model_validate_json(out.read_text()).adaptive_selective
    assert sec is not None and sec.n == 10 and sec.served_score == "max_softmax"
    assert [(r.score, r.coverage) for r in sec.rows] == [
        ("max_softmax", 0.8), ("max_softmax", 0.9), ("iterations", 0.8), ("iterations", 0.9)]
    assert sec.skipped and "detector" in sec.skipped[0]  # the copy has no learned detector
    stored = selective_from_metadata(read_metadata(ckpt))
    for r in sec.rows:
        if r.score == "max_softmax":  # the served thresholds
            assert r.threshold_source == "checkpoint"
            assert r.threshold == pytest.approx(stored.threshold(r.coverage))
        else:
            assert r.threshold_source == "validation"
        assert r.pgd_error_rate == sec.pgd["error_rate"]
        assert r.weaker_than_pgd == (r.attack_error_rate < r.pgd_error_rate)
        assert r.attack["iters"] == 3 and r.attack["targets"] == 1
        assert f"{r.score}@{r.coverage:g}" in summary["adaptive_selective"]
    by = {(r.score, r.coverage): r for r in sec.rows}
    # a higher coverage's threshold answers at least as much, and its attack starts from the
    # lower one's result: it never gives fewer wrong answers
    for name in ("max_softmax", "iterations"):
        assert by[name, 0.9].wrong_answered >= by[name, 0.8].wrong_answered
    md = (rep / "report.md").read_text()
    assert "What the doubt scores are worth under attack" in md
    # cached chunks: a rerun reads them and reports the same
    assert len(list(cache.rglob("*.npz"))) >= 5
    assert main(args) == 0
    again = EvalReport.model_validate_json(out.read_text()).adaptive_selective
    assert [r.wrong_answered for r in again.rows] == [r.wrong_answered for r in sec.rows]


@pytest.mark.parametrize("extra, words", [
    (["--adaptive-scores", "max_softmax,bogus"], "bogus"),
    (["--adaptive-coverages", "0.8,1.5"], "--adaptive-coverages"),
    (["--iters", "0"], "--iters"),
    (["--targets", "0", "--adaptive-restarts", "0"], "no attack"),
])
def test_bad_requests_are_one_line_errors(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys,
                                          extra, words):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    rc = main(["eval", str(ckpt), "--attacks", "clean,adaptive-selective",
               *_fast(pattern_idx_dir), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
