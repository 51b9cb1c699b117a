"""Tuning the Sec 3.2 defense: chosen on validation images only, by its stated rule; resumable."""

from __future__ import annotations

import json
import shutil

import pytest

from deqguard.errors import DeqguardError
from deqguard.evaluation import defense_tune as dt
from deqguard.models.defense import EntropyReductionConfig


def test_grid_is_the_product_plus_the_served_default():
    grid = dt.parse_grid("rounds=2,4 input_steps=3,10")
    assert grid[0] == EntropyReductionConfig()
    # (4, 10) with the other fields at their defaults is the served default: listed once
    assert [(c.rounds, c.input_steps) for c in grid] == [(4, 10), (2, 3), (2, 10), (4, 3)]
    with pytest.raises(DeqguardError, match="unknown setting 'round'"):
        dt.parse_grid("round=2")
    with pytest.raises(DeqguardError, match="invalid setting"):
        dt.parse_grid("rounds=0")


def _point(clean: str, robust: str, cost: float = 2.0) -> dt.TunePoint:
    acc = [s.count("1") / len(s) for s in (clean, robust)]
    return dt.TunePoint(config=EntropyReductionConfig(), clean_accuracy=acc[0],
                        robust_accuracy=acc[1], per_path={}, seconds_per_sample=cost,
                        seconds_per_sample_undefended=1.0, overhead_ratio=cost,
                        clean_correct=clean, robust_correct=robust)


def test_choice_is_the_most_robust_setting_that_keeps_clean_accuracy():
    ref = dt.Reference(clean_accuracy=0.8, robust_accuracy=0.4, clean_correct="1111111100",
                       robust_correct="1111000000")
    points = [_point("1111111100", "1111100000"),   # clean kept, robust +0.1
              _point("1111110000", "1111111000"),   # most robust, loses 0.2 clean
              _point("1111111110", "1111100000", cost=1.5),  # as robust, more clean
              _point("1111111100", "1111000000")]
    for p in points:
        dt.compare(p, ref, max_clean_drop=0.05, reps=200)
    assert [p.eligible for p in points] == [True, False, True, True]
    assert dt.choose(points) == 2
    assert points[2].robust_gain == pytest.approx(0.1)
    lo, hi = points[2].robust_gain_interval
    assert lo <= 0.1 <= hi
    # Paired over images: the same outcomes on every image leave no doubt about the difference,
    # where two independent resamples of the accuracies would give a wide interval.
    assert points[0].clean_gain_interval == [0.0, 0.0]
    assert dt.choose([points[1]]) is None


@pytest.fixture()
def recorded(tiny_checkpoint, pattern_idx_dir, tmp_path):
    from selective_ckpt import record_dataset

    return record_dataset(shutil.copy(tiny_checkpoint, tmp_path / "rec.safetensors"),
                          pattern_idx_dir)


def test_tuner_reads_only_validation_images_and_resumes(recorded, tmp_path, monkeypatch,
                                                        capsys):
    import deqguard.training.data as data

    splits = []
    real = data.load_dataset

    def spy(name, split, **kw):
        splits.append(split)
        return real(name, split, **kw)

    monkeypatch.setattr(data, "load_dataset", spy)
    out = tmp_path / "tune.json"
    argv = [str(recorded), "--out", str(out), "--n", "12", "--pgd-steps", "1", "--grid",
            "rounds=1,2 input_steps=1", "--paths", "exact,full", "--repeats", "1",
            "--batch-size", "12"]
    assert dt.main(argv) == 0
    assert splits and set(splits) == {"val"}
    report = dt.DefenseTuneReport.model_validate_json(out.read_text())
    assert report.settings.split == "val" and report.settings.n == 12
    assert len(report.points) == 3
    assert all(set(p.per_path) == {"exact", "full"} for p in report.points)
    for p in report.points:  # robust counts a sample only when clean and every path hold it
        assert p.robust_accuracy <= min([p.clean_accuracy, *p.per_path.values()])
    best = report.best
    assert best is None or (report.points[best].eligible
                            and report.best_config == report.points[best].config)

    scored = []
    monkeypatch.setattr(dt, "score_config", lambda *a, **k: scored.append(a))
    assert dt.main(argv) == 0  # the same run again: every setting is already there
    assert scored == []
    assert json.loads(out.read_text())["points"] == json.loads(report.model_dump_json())[
        "points"]
    capsys.readouterr()
    assert dt.main([*argv[:-2], "--batch-size", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defense_tune: error:") and "other settings" in err
    assert "\n" not in err


def test_eval_takes_the_tuned_choice_from_the_report(tmp_path):
    """`deqguard eval --defense-config REPORT` evaluates what the tuning chose; --defense-set
    still overrides single fields; a report without a choice is a clear error."""
    import argparse

    from deqguard.evaluation.eval_settings import _defense_settings

    chosen = EntropyReductionConfig(rounds=2, solver_steps_per_round=8, input_steps=3)
    settings = dt.TuneSettings(checkpoint="c", sha256="s", data="fashion-mnist", data_dir=None,
                               val_size=100, split_seed=0, n=10, eps=0.1, pgd_steps=1,
                               step_size=0.25, paths=["exact"], max_clean_drop=0.01, seed=0,
                               batch_size=10)
    report = dt.DefenseTuneReport(settings=settings, rule=dt.RULE, best=0, best_config=chosen)
    path = tmp_path / "tune.json"
    path.write_text(report.model_dump_json())

    def args(**kw):
        base = {"defense": "entropy-reduction", "defense_set": None, "defense_config": None}
        return argparse.Namespace(**{**base, **kw})

    assert _defense_settings(args(defense_config=str(path))) == chosen
    assert _defense_settings(args(defense_config=str(path), defense_set=["input_steps=5"])
                             ) == chosen.model_copy(update={"input_steps": 5})
    plain = tmp_path / "cfg.json"
    plain.write_text(chosen.model_dump_json())
    assert _defense_settings(args(defense_config=str(plain))) == chosen
    path.write_text(report.model_copy(update={"best": None, "best_config": None})
                    .model_dump_json())
    with pytest.raises(DeqguardError, match="chose no setting"):
        _defense_settings(args(defense_config=str(path)))
    with pytest.raises(DeqguardError, match="needs --defense entropy-reduction"):
        _defense_settings(args(defense="none", defense_config=str(plain)))
    with pytest.raises(DeqguardError, match="defense setting rounds"):
        _defense_settings(args(defense_set=["rounds=0"]))
