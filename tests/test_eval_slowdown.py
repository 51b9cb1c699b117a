"""Slowdown attacks: APGD's step-size schedule, the attack on the tiny DEQ's solvers, and the
`deqguard eval --attacks slowdown` part end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deqguard.cli import main
from deqguard.evaluation.schema import EvalReport
from deqguard.evaluation.slowdown import (
    apgd_maximise,
    quantize_in_ball,
    residual_after,
    slowdown_attack,
)

EPS = 0.1


def test_apgd_halves_its_step_onto_an_interior_maximum():
    """max -|x - c|_1 with c inside the ball: a fixed sign step of 2 eps oscillates around c
    (error ~eps per coordinate); APGD's halvings at its checkpoints home in on it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 50, generator=g) * 0.8 + 0.1
    c = x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.08

    def loss(xa):
        return -(xa - c).abs().sum(1)

    x_adv, best = apgd_maximise(loss, x, eps=EPS, steps=100,
                                generator=torch.Generator().manual_seed(1))
    assert torch.allclose(best, loss(x_adv))
    assert float(best.min()) > -0.1  # 50 coordinates; one fixed step of 2 eps costs ~5
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6


def test_apgd_restarts_keep_the_best_per_sample():
    x = torch.full((4, 3), 0.5)
    calls = []

    def loss(xa):  # a different landscape per restart: the later one is worse
        calls.append(1)
        return xa.sum(1) * (1.0 if len(calls) <= 6 else -1.0)

    x_adv, best = apgd_maximise(loss, x, eps=EPS, steps=5, restarts=2)
    assert torch.allclose(x_adv, torch.full_like(x, 0.5 + EPS))
    assert torch.allclose(best, torch.full((4,), 3 * (0.5 + EPS)))


@pytest.mark.parametrize("solver", ["anderson", "naive"])
def test_the_attack_raises_the_residual_after_k_within_the_ball(tiny_model, pattern_data,
                                                                solver):
    x = torch.from_numpy(pattern_data[0][:16])
    k = 3
    x_adv, log_res = slowdown_attack(tiny_model, x, eps=EPS, k=k, steps=10, solver=solver,
                                     generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    x_noise = (x + EPS * noise).clamp(0, 1)
    with torch.no_grad():
        clean = residual_after(tiny_model, x, k, solver).log()
        attacked = residual_after(tiny_model, x_adv, k, solver).log()
        random = residual_after(tiny_model, x_noise, k, solver).log()
    assert torch.allclose(attacked, log_res, atol=1e-4)  # the returned loss is the residual's
    assert float((attacked > clean).float().mean()) >= 0.9
    # at least 10% higher on average than clean, and than a random point of the ball
    assert float((attacked - clean).mean()) > np.log(1.1)
    assert float((attacked - random).mean()) > np.log(1.1)


def test_quantized_attack_stays_in_the_ball_on_the_8bit_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 6, 6), generator=g).float() / 255
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.3).clamp(0, 1)  # out of ball
    q = quantize_in_ball(x_adv, x, EPS)
    assert q.dtype == torch.uint8
    back = q.float() / 255
    assert float((back - x).abs().max()) <= EPS + 1e-6
    inside = (x_adv - x).abs() <= EPS - 1 / 255
    assert float((back - x_adv)[inside].abs().max()) <= 0.5 / 255 + 1e-6


def test_eval_slowdown_part_end_to_end(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys):
    out, rep, adv = tmp_path / "eval.json", tmp_path / "report", tmp_path / "adv"
    rc = main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist", "--data-dir",
               str(pattern_idx_dir), "--attacks", "clean,slowdown", "--n", "6",
               "--slowdown-solvers", "anderson,naive", "--slowdown-k", "3",
               "--slowdown-steps", "2", "--slowdown-cap", "40", "--slowdown-save", str(adv),
               "--json", str(out), "--report", str(rep), "--no-progress", "--threads", "1"])
    assert rc == 0
    report = EvalReport.model_validate_json(out.read_text())
    sec = report.slowdown
    assert sec is not None and sec.default_max_iter == 30
    assert [r.solver for r in sec.results] == ["anderson", "naive"]
    for r in sec.results:
        assert r.k == 3 and r.n == 6 and r.eps == report.settings.eps
        assert [b.max_iter for b in r.budgets] == [30, 40]
        assert [b.is_default for b in r.budgets] == [True, False]
        for b in r.budgets:
            for stats in (b.clean, b.attacked):
                assert 1 <= stats.mean_iterations <= stats.max_iterations <= b.max_iter
                assert stats.ms_per_answer > 0
        saved = np.load(adv / f"slowdown-{r.solver}.npz")
        assert np.abs(saved["x_adv"] - saved["x"]).max() <= report.settings.eps + 1e-6
        assert np.abs(saved["x_adv_uint8"] / 255 - saved["x"]).max() <= report.settings.eps + 1e-6
        pngs = sorted((adv / f"slowdown-{r.solver}").glob("*.png"))
        assert len(pngs) == 6
        assert np.array_equal(np.asarray(Image.open(pngs[0])), saved["x_adv_uint8"][0, 0])
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["slowdown"]) == {"anderson/max_iter30", "anderson/max_iter40",
                                        "naive/max_iter30", "naive/max_iter40"}
    assert "## Slowdown attacks" in (rep / "report.md").read_text()


def test_eval_slowdown_refuses_an_unknown_solver(tiny_checkpoint, pattern_idx_dir, capsys):
    rc = main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist", "--data-dir",
               str(pattern_idx_dir), "--attacks", "slowdown", "--n", "2",
               "--slowdown-solvers", "anderson,newton", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("deqguard eval: error:") and "newton" in err
    assert "Traceback" not in err


def test_a_rerun_with_the_same_settings_reads_the_saved_attack(tiny_checkpoint, pattern_idx_dir,
                                                               tmp_path):
    adv = tmp_path / "adv"

    def run(steps: str) -> EvalReport:
        out = tmp_path / f"eval-{steps}.json"
        assert main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist", "--data-dir",
                     str(pattern_idx_dir), "--attacks", "slowdown", "--n", "4",
                     "--slowdown-k", "2", "--slowdown-steps", steps, "--slowdown-cap", "30",
                     "--slowdown-save", str(adv), "--json", str(out), "--no-progress",
                     "--threads", "1"]) == 0
        return EvalReport.model_validate_json(out.read_text())

    first = run("2")
    saved = np.load(adv / "slowdown-anderson.npz")["x_adv"]
    again = run("2")
    assert [r.resumed for r in first.slowdown.results] == [False]
    assert [r.resumed for r in again.slowdown.results] == [True]
    assert again.slowdown.results[0].seconds == pytest.approx(first.slowdown.results[0].seconds)
    assert np.array_equal(np.load(adv / "slowdown-anderson.npz")["x_adv"], saved)
    other = run("3")  # other settings: attacked again, and saved over
    assert [r.resumed for r in other.slowdown.results] == [False]
