"""The attacks aimed at the rectifier head beyond CE + lam BCE (rectifier_attack.py), the
over-rejection measure, and the `deqguard eval --attacks rectifier-aware` part end to end on the
fixture checkpoint with a fresh head."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from headed import headed_model

from deqguard.cli import main
from deqguard.evaluation.rectifier_attack import (
    doubt_raising_pgd,
    multi_targeted_pgd,
    targeted_rectified_objective,
)
from deqguard.evaluation.rectifier_eval import over_rejection, worst_case
from deqguard.evaluation.schema import EvalReport
from deqguard.evaluation.selective_attack import top_wrong_classes
from deqguard.models import save_checkpoint
from deqguard.models.selective import doubt_score

EPS = 0.1


def _headed(checkpoint, trajectory: int = 0) -> torch.nn.Module:
    """The fixture network with a fresh rectifier head (its A is some function of z* and the
    path: enough for the attacks to have something to move)."""
    return headed_model(checkpoint, {"hidden": 16, "trajectory": trajectory})


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("trajectory", [0, 3])
def test_the_multi_targeted_attack_raises_each_targets_objective_inside_the_ball(
        tiny_checkpoint, pattern_data, trajectory):
    model = _headed(tiny_checkpoint, trajectory)
    x, y = (torch.from_numpy(v)[:8] for v in pattern_data)
    targets = top_wrong_classes(model, x, y, 2)
    sets = multi_targeted_pgd(model, x, targets, eps=EPS, steps=5, seed=0)
    assert len(sets) == 2
    for j, x_adv in enumerate(sets):
        _in_ball(x_adv, x, EPS)
        with torch.no_grad():
            before = targeted_rectified_objective(model, x, targets[:, j]).mean()
            after = targeted_rectified_objective(model, x_adv, targets[:, j]).mean()
        assert float(after) > float(before)
    # each target is its own search
    assert not torch.equal(sets[0], sets[1])


@pytest.mark.parametrize("score", ["rectified", "max_softmax"])
def test_the_nudge_raises_the_doubt_and_keeps_the_answer_inside_the_ball(
        tiny_checkpoint, pattern_data, score):
    model = _headed(tiny_checkpoint)
    x = torch.from_numpy(pattern_data[0][:8])
    with torch.no_grad():
        clean = model.solve(x)
    label = clean.logits.argmax(1)
    eps = EPS / 4
    x_adv = doubt_raising_pgd(model, x, label, score, eps=eps, steps=5, seed=0)
    _in_ball(x_adv, x, eps)
    with torch.no_grad():
        nudged = model.solve(x_adv)
    assert torch.equal(nudged.logits.argmax(1), label)
    before, after = doubt_score(clean, score), doubt_score(nudged, score)
    assert bool((after >= before - 1e-6).all()) and float(after.mean()) > float(before.mean())


def test_over_rejection_counts_the_answers_a_nudge_takes_away():
    y = np.array([0, 1, 2, 3, 0, 1])
    clean_pred = np.array([0, 1, 2, 0, 0, 1])  # image 3 is wrong
    clean_doubt = np.array([0.1, 0.2, 0.6, 0.1, 0.3, 0.1])  # tau 0.5: all but image 2 answered
    nudged_pred = np.array([0, 1, 2, 0, 2, 1])  # image 4's answer changed: not counted
    nudged_doubt = np.array([0.7, 0.4, 0.9, 0.8, 0.9, 0.1])  # 0, 3, 4 cross; 2 was out
    out = over_rejection(clean_doubt, clean_pred, nudged_doubt, nudged_pred, y, 0.5)
    assert out["clean_coverage"] == pytest.approx(5 / 6)
    assert out["nudged_coverage"] == pytest.approx(2 / 6)
    assert out["answer_kept"] == pytest.approx(5 / 6)
    assert out["pushed_out"] == pytest.approx(2 / 6)  # images 0 and 3
    assert out["pushed_out_of_answered"] == pytest.approx(2 / 5)
    assert out["correct_pushed_out"] == pytest.approx(1 / 6)  # image 0 only


def test_the_worst_case_prefers_a_wrong_answer_that_is_answered():
    y = np.array([0, 0, 0])
    # three candidate sets (rows) for three images (columns), threshold 0.5
    preds = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    doubts = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.1, 0.6, 0.3]])
    # image 0: set 1 is wrong and answered; image 1: both wrong sets abstain, the lower doubt
    # (set 2) is the nearer to an answer; image 2: all right, the highest doubt (set 1)
    assert worst_case(doubts, preds, y, 0.5).tolist() == [1, 2, 1]


def _fast(data_dir) -> list[str]:
    return ["--data", "fashion-mnist", "--data-dir", str(data_dir), "--n", "6",
            "--val-n", "30", "--val-size", "100", "--batch-size", "10", "--no-progress",
            "--threads", "1", "--selective-pgd-steps", "2", "--rectifier-steps", "2",
            "--rectifier-targets", "2", "--reps", "20"]


def test_cli_part_end_to_end(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys):
    ckpt = tmp_path / "headed.safetensors"
    save_checkpoint(_headed(tiny_checkpoint), ckpt, {"classes": ["a", "b", "c", "d"]})
    out, rep = tmp_path / "r.json", tmp_path / "report"
    args = ["eval", str(ckpt), "--attacks", "clean,rectifier-aware", "--json", str(out),
            "--report", str(rep), "--rectifier-lambdas", "0.5,2", *_fast(pattern_idx_dir)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    sec = EvalReport.model_validate_json(out.read_text()).rectifier
    assert sec is not None and sec.n == 6 and sec.head_trajectory == 0
    attacks = ["pgd2-exact", "lam0.5", "lam2", "target1", "target2", "worst-case"]
    for c in (0.8, 0.9):
        got = [(r.score, r.attack) for r in sec.rows if r.coverage == c]
        assert got == [("rectified", "pgd2-exact"), ("max_softmax", "pgd2-exact")] + [
            ("rectified", a) for a in attacks[1:]]
        rows = {r.attack: r for r in sec.rows if r.coverage == c and r.score == "rectified"}
        # the per-image worst case errs at least as often as any of the sets it picks from
        assert rows["worst-case"].attack_error_rate >= max(
            rows[a].attack_error_rate for a in attacks[1:-1])
        assert rows["worst-case"].wrong_answered >= max(
            rows[a].wrong_answered for a in attacks[1:-1])
    assert [(r.score, r.coverage) for r in sec.over_rejection] == [
        ("rectified", 0.8), ("rectified", 0.9), ("max_softmax", 0.8), ("max_softmax", 0.9)]
    assert all(r.eps == pytest.approx(0.025) for r in sec.over_rejection)
    assert "rectified/worst-case@0.9" in summary["rectifier"]
    md = (rep / "report.md").read_text()
    assert "The rectifier head under attacks aimed at it" in md and "Over-rejection" in md


def test_the_part_is_skipped_with_a_warning_without_a_head(tiny_checkpoint, pattern_idx_dir,
                                                           tmp_path, capsys):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    assert main(["eval", str(ckpt), "--attacks", "clean,rectifier-aware",
                 *_fast(pattern_idx_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "rectifier" not in summary
    assert any("no rectifier head" in w for w in summary["warnings"])


@pytest.mark.parametrize("extra, words", [
    (["--rectifier-attacks", "lam-pgd,bogus"], "bogus"),
    (["--rectifier-attacks", ""], "--rectifier-attacks"),
    (["--rectifier-lambdas", "1,x"], "--rectifier-lambdas"),
    (["--rectifier-lambdas", "-1"], "--rectifier-lambdas"),
    (["--rectifier-coverages", "0.8,1.5"], "--rectifier-coverages"),
    (["--rectifier-steps", "0"], "--rectifier-steps"),
    (["--rectifier-targets", "0"], "--rectifier-targets"),
    (["--nudge-eps", "2"], "--nudge-eps"),
])
def test_bad_requests_are_one_line_errors(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys,
                                          extra, words):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    rc = main(["eval", str(ckpt), "--attacks", "clean,rectifier-aware", *_fast(pattern_idx_dir),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_parsers_attack_names_are_the_schemas():
    from deqguard.evaluation.choices import PARTS
    from deqguard.evaluation.rectifier_cli import ATTACKS
    from deqguard.evaluation.rectifier_eval_schema import RECTIFIER_ATTACKS
    from deqguard.evaluation.schema import ALL_PARTS

    assert ATTACKS == RECTIFIER_ATTACKS
    assert "rectifier-aware" in PARTS and set(PARTS) == set(ALL_PARTS)
