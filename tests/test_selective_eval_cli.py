"""`deqguard eval --attacks clean,selective` and `--calibrate-selective` end to end on the
fixture checkpoint and the pattern data: the report, the plots, the written calibration."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from selective_ckpt import with_detector

from deqguard.cli import main
from deqguard.evaluation.schema import EvalReport
from deqguard.models import load_checkpoint, read_metadata
from deqguard.models.selective import doubt_score, selective_from_metadata

N_VAL = 60


def _fast(data_dir) -> list[str]:
    return ["--data", "fashion-mnist", "--data-dir", str(data_dir), "--n", "16",
            "--val-n", str(N_VAL), "--val-size", "100", "--batch-size", "16", "--no-progress",
            "--threads", "1", "--selective-attack-n", "8", "--selective-pgd-steps", "2",
            "--selective-adaptive-n", "4", "--selective-adaptive-steps", "1", "--reps", "50"]


@pytest.fixture()
def det_copy(tiny_checkpoint, tmp_path):
    """The fixture checkpoint with a (hand-made) learned detector; the CLI rewrites its
    metadata, so never the session checkpoint."""
    return with_detector(tiny_checkpoint, tmp_path / "tiny-det.safetensors")


def _val_images(data_dir) -> torch.Tensor:
    from deqguard.training.data import load_dataset

    ds = load_dataset("fashion-mnist", "val", data_dir=data_dir, val_size=100, limit=N_VAL)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_risk_coverage_report_and_written_calibration(det_copy, pattern_idx_dir, tmp_path,
                                                      capsys):
    out, rep, cache = tmp_path / "eval.json", tmp_path / "report", tmp_path / "cache"
    args = ["eval", str(det_copy), "--attacks", "clean,selective", "--json", str(out),
            "--report", str(rep), "--selective-cache", str(cache), *_fast(pattern_idx_dir)]
    assert main([*args, "--calibrate-selective", "--selective-score", "mean_entropy"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = EvalReport.model_validate_json(out.read_text())
    sel = report.selective
    assert sel is not None and sel.n_val == N_VAL and sel.skipped == []
    assert set(sel.scores) == {"detector", "mean_entropy", "final_entropy", "max_softmax",
                               "iterations"}
    kinds = {k.kind: k for k in sel.kinds}
    assert list(kinds) == ["clean", "pgd2-exact", "detector-aware-lam2"]
    assert [kinds[k].n for k in kinds] == [16, 8, 4]
    assert kinds["clean"].n_successful is None and kinds["pgd2-exact"].n_successful is not None
    assert kinds["pgd2-exact"].attack["gradient"] == "exact"
    for kind in sel.kinds:
        assert set(kind.scores) == set(sel.scores) and kind.best in sel.scores
        for name, r in kind.scores.items():
            assert r.threshold == sel.val_thresholds[name]
            assert r.curve.coverage[-1] == 1.0 and r.curve.accuracy[-1] == pytest.approx(
                kind.accuracy)
            assert r.aurc_ci is not None and r.coverage_ci is not None
            assert (r.successful_answered is None) == (kind.n_successful in (None, 0))
    for name in ("mean_entropy", "final_entropy", "max_softmax", "detector"):  # continuous
        assert abs(sel.val_realised[name] - 0.9) <= 1 / N_VAL
    # printed to 4 significant digits for people; the JSON report keeps the exact number
    assert summary["selective"]["clean"]["max_softmax"]["aurc"] == pytest.approx(
        kinds["clean"].scores["max_softmax"].aurc, rel=5e-4)
    # the calibration: written, and its thresholds answer the stored shares of the val images
    assert sel.written_to_checkpoint and summary["selective_calibration"]["written"]
    meta = read_metadata(det_copy)
    cal = selective_from_metadata(meta)
    assert cal is not None and cal.score == "mean_entropy" and cal.n_calibration == N_VAL
    assert cal.model_sha256 == meta.sha256 and cal.solve.solver == "anderson"
    assert "--calibrate-selective" in cal.provenance["command"]
    assert cal.provenance["val_size"] == 100 and len(cal.metrics["val_accuracy_answered"]) == (
        len(cal.coverages))
    model, _ = load_checkpoint(det_copy, device="cpu")
    with torch.no_grad():
        s = doubt_score(model.solve(_val_images(pattern_idx_dir)), "mean_entropy").numpy()
    for c, t, r in zip(cal.coverages, cal.thresholds, cal.realised, strict=True):
        assert np.mean(s <= t) == pytest.approx(r) and abs(r - c) <= 1 / N_VAL
    md = (rep / "report.md").read_text()
    assert "Selective answers" in md and "detector-aware-lam2" in md
    for kind in kinds:
        assert (rep / f"selective-{kind}.png").stat().st_size > 0
    # the attacked sets were cached: a rerun reads them and measures the same
    assert len(list(cache.rglob("*.npz"))) >= 2
    assert main(args) == 0
    again = EvalReport.model_validate_json(out.read_text()).selective
    assert [k.accuracy for k in again.kinds] == [k.accuracy for k in sel.kinds]


def test_calibration_alone_needs_no_attacks(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    out = tmp_path / "cal.json"
    assert main(["eval", str(ckpt), "--attacks", "clean", "--calibrate-selective",
                 "--json", str(out), *_fast(pattern_idx_dir)]) == 0
    sel = EvalReport.model_validate_json(out.read_text()).selective
    assert sel is not None and sel.kinds == [] and sel.scores == ["max_softmax"]
    cal = selective_from_metadata(read_metadata(ckpt))
    assert cal.score == "max_softmax" and cal.coverages[0] == 0.1 and cal.coverages[-1] == 1.0


@pytest.mark.parametrize("extra, words", [
    (["--calibrate-selective", "--selective-score", "detector"], "learned detector"),
    (["--attacks", "clean,selective", "--selective-scores", "max_softmax,bogus"], "bogus"),
    (["--calibrate-selective", "--coverages", "0.5,1.5"], "--coverages"),
])
def test_bad_selective_requests_are_refused(tiny_checkpoint, pattern_idx_dir, tmp_path, capsys,
                                            extra, words):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    args = ["eval", str(ckpt), "--attacks", "clean", *_fast(pattern_idx_dir), *extra]
    rc = main(args)
    assert rc == 2 and words in capsys.readouterr().err
    assert selective_from_metadata(read_metadata(ckpt)) is None


def test_cli_spells_out_the_models_scores_and_coverages():
    """The CLI lists them without importing torch; they must stay the models' own."""
    from deqguard.evaluation import cli
    from deqguard.models import selective

    assert cli.SELECTIVE_SCORES == selective.SCORE_NAMES
    assert cli.SELECTIVE_COVERAGES == selective.DEFAULT_COVERAGES
