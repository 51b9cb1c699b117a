"""A tiny `deqguard eval` run end to end: JSON valid against the schema, report, calibration;
the first run of a new user: the dataset from the checkpoint, defaults that finish, readable
numbers, help on every option, and the server's printed fix running as printed."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

from deqguard.cli import main
from deqguard.evaluation.per_sample import unbits
from deqguard.evaluation.schema import EvalReport
from deqguard.models import read_metadata
from deqguard.models.detection_scores import DetectionCalibration

FAST = ["--n", "16", "--pgd-steps", "2", "--steps-sweep", "1,2", "--eps-sweep", "1",
        "--large-eps", "0.5", "--budgets", "1,5", "--intermediate", "1:2", "--aa-n", "4",
        "--aa-attacks", "apgd-ce", "--val-n", "40", "--val-size", "100", "--batch-size", "16",
        "--no-progress", "--threads", "1"]


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    """--calibrate rewrites metadata: never on the session checkpoint other tests share."""
    return shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")


@pytest.fixture()
def recorded_copy(tiny_checkpoint, pattern_idx_dir, tmp_path):
    """A copy of the fixture checkpoint whose metadata records its dataset as `deqguard train`
    does (training.config.data): the pattern data in Fashion-MNIST format."""
    from selective_ckpt import record_dataset

    return record_dataset(shutil.copy(tiny_checkpoint, tmp_path / "recorded.safetensors"),
                          pattern_idx_dir)


def test_eval_json_report_and_calibration(ckpt_copy, pattern_idx_dir, tmp_path, capsys):
    out, rep = tmp_path / "eval.json", tmp_path / "report"
    rc = main(["eval", str(ckpt_copy), "--data", "fashion-mnist", "--data-dir",
               str(pattern_idx_dir), "--json", str(out), "--report", str(rep), "--calibrate",
               "--logistic", "--attacks", "clean,budget,pgd,adaptive,aa,detect", *FAST])
    assert rc == 0
    report = EvalReport.model_validate_json(out.read_text())  # the documented schema
    summary = json.loads(capsys.readouterr().out)
    # printed to 4 significant digits for people; the JSON report keeps the exact number
    assert summary["clean_accuracy"] == pytest.approx(report.clean.accuracy, rel=5e-4)
    names = [a.name for a in report.attacks]
    assert {"pgd2-phantom", "pgd2-implicit", "pgd2-exact", "Munroll-1-2"} <= set(names)
    assert any(n.startswith("detector-adaptive") for n in names)
    assert report.autoattack is not None and report.autoattack.n == 4
    assert report.autoattack.gradient == "exact"  # not the phantom path it trained with
    wc = report.worst_case
    assert wc is not None and "autoattack" in wc.attacks
    # With AutoAttack the worst case is over its first aa-n samples (4), the attacks over --n
    # (16): the 4-sample rate may exceed a 16-sample one (seen for some fixture seeds). What
    # must hold: no more robust than AutoAttack on the same samples, and no sample counted
    # robust that an attack fooled (count against count).
    assert wc.n == report.autoattack.n
    assert wc.accuracy <= report.autoattack.accuracy + 1e-9
    assert all(wc.accuracy * wc.n <= a.accuracy * a.n + 1e-9 for a in report.attacks)
    # per-image outcomes (what `deqguard compare` pairs) agree with the rates beside them
    kept = {"clean": (report.clean.correct, report.clean.accuracy, report.clean.n),
            "worst case": (wc.correct, wc.accuracy, wc.n)}
    kept |= {f"aa {k}": (s, report.autoattack.accuracy_after[k], report.autoattack.n)
             for k, s in report.autoattack.correct_after.items()}
    assert set(kept) == {"clean", "worst case", "aa clean", "aa apgd-ce"}
    for name, (bits, rate, n) in kept.items():
        assert len(bits) == n and unbits(bits).mean() == pytest.approx(rate), name
    assert not (unbits(wc.correct) & ~unbits(report.autoattack.correct_after["apgd-ce"])).any()
    assert [p.max_iter for p in report.budget] == [1, 5, 30]
    assert report.sweeps is not None and report.sweeps.eps[-1].value == 0.5
    assert report.sweeps.attack == "pgd2-exact"  # not the phantom path it trained with
    det = report.detection
    assert det is not None and "logistic" in det.scores
    assert det.trajectories[0].label == "clean" and len(det.trajectories[0].entropy_mean) > 1
    # calibration: validation threshold, written into the checkpoint's metadata
    assert det.written_to_checkpoint
    stored = read_metadata(ckpt_copy).detection
    cal = DetectionCalibration.model_validate(stored)
    assert cal.score == "mean_entropy" and cal.fpr == 0.05 and cal.n_calibration == 40
    assert stored == det.calibration
    for f in ("report.md", "robust_accuracy.png", "entropy_trajectory.png", "roc.png",
              "sweeps.png", "budget.png"):
        assert (rep / f).stat().st_size > 0, f
    assert "worst case per sample" in (rep / "report.md").read_text()


def test_sweeps_go_through_the_requested_gradient(tiny_checkpoint, pattern_idx_dir, tmp_path):
    out = tmp_path / "sweep.json"
    assert main(["eval", str(tiny_checkpoint), "--data", "fashion-mnist", "--data-dir",
                 str(pattern_idx_dir), "--json", str(out), "--attacks", "pgd", "--paths",
                 "phantom", "--sweep-gradient", "implicit", *FAST]) == 0
    report = EvalReport.model_validate_json(out.read_text())
    assert report.settings.sweep_gradient == "implicit"
    assert report.sweeps is not None and report.sweeps.attack == "pgd2-implicit"


def test_eval_with_defense(ckpt_copy, pattern_idx_dir, tmp_path):
    out = tmp_path / "def.json"
    rc = main(["eval", str(ckpt_copy), "--data", "fashion-mnist", "--data-dir",
               str(pattern_idx_dir), "--json", str(out), "--attacks", "clean,pgd,adaptive",
               "--defense", "entropy-reduction", "--defense-set", "input_steps=2",
               "--paths", "phantom", "--intermediate", "", *FAST[:2], "--pgd-steps", "2",
               "--steps-sweep", "2", "--eps-sweep", "1", "--no-progress"])
    assert rc == 0
    r = EvalReport.model_validate_json(out.read_text())
    threats = {a.name: a.threat for a in r.attacks}
    assert threats["pgd2-phantom"] == "transfer" and threats["bpda-pgd2-exact"] == "adaptive"
    assert r.defense is not None and r.defense.overhead_ratio > 0
    assert r.defense.adaptive_accuracy is not None and r.defense.transfer_accuracy is not None
    assert r.settings.defense_config.input_steps == 2
    assert r.clean.mean_iterations == 8  # 4 rounds x 2 solver steps


@pytest.mark.parametrize("dest", ["aa_gradient", "sweep_gradient"])
def test_gradient_choices_are_the_models_gradient_modes(dest):
    """The CLI spells the modes out (importing models.config would load torch for --help)."""
    from typing import get_args

    from deqguard.cli import build_parser
    from deqguard.models.config import GradMode

    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    action = next(a for a in eval_parser._actions if a.dest == dest)
    assert sorted(action.choices) == sorted(get_args(GradMode))


def test_schema_flag_prints_the_schema(capsys):
    assert main(["eval", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "EvalReport" and "attacks" in schema["properties"]


def test_calibrated_threshold_from_cli_run_has_asked_fpr_on_val(ckpt_copy, pattern_idx_dir):
    """Recompute the validation scores and check the stored threshold's FPR on them."""
    from deqguard.models import load_checkpoint
    from deqguard.models.detection_scores import detection_score
    from deqguard.training.data import load_dataset

    rc = main(["eval", str(ckpt_copy), "--data", "fashion-mnist", "--data-dir",
               str(pattern_idx_dir), "--attacks", "clean,detect", "--calibrate",
               "--calibration-score", "max_softmax", "--fpr", "0.1", "--val-n", "100",
               "--val-size", "100",
               "--n", "8", "--pgd-steps", "1", "--no-progress"])
    assert rc == 0
    model, meta = load_checkpoint(ckpt_copy, device="cpu")
    ds = load_dataset("fashion-mnist", "val", data_dir=pattern_idx_dir, val_size=100)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        s = detection_score(model.solve(x), "max_softmax").numpy()
    cal = meta.detection
    assert np.mean(s > cal["threshold"]) == pytest.approx(0.1, abs=0.011)


def _floats(value) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


def test_eval_without_data_reads_the_checkpoints_dataset_and_skips_autoattack(
        recorded_copy, pattern_idx_dir, tmp_path, capsys, monkeypatch):
    """No --data, no --attacks: the recorded dataset, the default parts, no AutoAttack; the
    printed numbers are rounded, the JSON report's exact."""
    from deqguard.evaluation import autoattack

    def refuse(*args, **kwargs):
        raise AssertionError("AutoAttack ran without being asked for")

    monkeypatch.setattr(autoattack, "run_autoattack", refuse)
    out = tmp_path / "eval.json"
    assert FAST[:2] == ["--n", "16"]
    rc = main(["eval", str(recorded_copy), "--json", str(out), "--calibrate", "--n", "15",
               *FAST[2:]])
    assert rc == 0
    printed = capsys.readouterr().out
    report = EvalReport.model_validate_json(out.read_text())
    assert report.settings.data == "fashion-mnist"
    assert report.settings.data_dir == str(pattern_idx_dir)
    assert report.settings.n == 15
    assert set(report.settings.parts) == {"clean", "budget", "pgd", "adaptive", "detect"}
    assert report.autoattack is None and report.detection is not None
    summary = json.loads(printed)
    numbers = _floats(summary)
    assert numbers and all(float(f"{v:.4g}") == v for v in numbers), printed
    assert summary["detection"]["threshold"] == pytest.approx(
        report.detection.calibration["threshold"], rel=5e-4)
    # exact in the JSON: an accuracy over 15 images is k/15 in float32, not cut to 4 digits
    acc = report.clean.accuracy
    assert acc * 15 == pytest.approx(round(acc * 15), abs=1e-5)


def test_data_and_data_dir_override_the_recorded_dataset(recorded_copy, tmp_path):
    from conftest import write_idx_dataset

    other = write_idx_dataset(tmp_path / "other", n_train=64, n_test=10, seed=5)
    out = tmp_path / "eval.json"
    assert main(["eval", str(recorded_copy), "--data", "fashion-mnist", "--data-dir",
                 str(other), "--attacks", "clean", "--json", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    settings = EvalReport.model_validate_json(out.read_text()).settings
    assert settings.data_dir == str(other) and settings.n == 10


def test_start_scores_later_images_that_compare_pairs_by_number(recorded_copy, pattern_idx_dir,
                                                                 tmp_path, capsys):
    """--start 5 --n 6 scores test images 6-11: the same images, labels and per-image outcomes
    as those of a run from image 1, and `deqguard compare` pairs the two on those six alone."""
    from deqguard.evaluation.eval_command import _test_images
    from deqguard.models import load_checkpoint
    from deqguard.training.data import load_dataset

    common = ["--attacks", "clean,aa", "--aa-attacks", "apgd-ce", "--batch-size", "16",
              "--no-progress", "--threads", "1"]
    full, later = tmp_path / "full.json", tmp_path / "later.json"
    assert main(["eval", str(recorded_copy), "--n", "12", "--json", str(full), *common]) == 0
    assert main(["eval", str(recorded_copy), "--start", "5", "--n", "6", "--json", str(later),
                 "--report", str(tmp_path / "later"), *common]) == 0
    a = EvalReport.model_validate_json(full.read_text())
    b = EvalReport.model_validate_json(later.read_text())
    assert (a.settings.start, b.settings.start, b.settings.n, b.clean.n) == (0, 5, 6, 6)
    ds = load_dataset("fashion-mnist", "test", data_dir=pattern_idx_dir)
    model, meta = load_checkpoint(recorded_copy, device="cpu")
    args = argparse.Namespace(start=5, n=6, split="test")
    x, y, _ = _test_images(args, model, meta, "fashion-mnist", str(pattern_idx_dir))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(5, 11)]))
    assert y.tolist() == [ds[i][1] for i in range(5, 11)] != [ds[i][1] for i in range(6)]
    assert unbits(b.clean.correct).tolist() == unbits(a.clean.correct)[5:11].tolist()
    assert capsys.readouterr().out.count('"images": "6-11"') == 1  # the second run's summary
    assert "(images 6-11)" in (tmp_path / "later" / "report.md").read_text()
    assert main(["compare", str(full), str(later), "--reps", "100"]) == 0
    table = capsys.readouterr().out
    assert "images 6 to 11" in table and "| full / later | clean | 6 |" in table
    assert "clean: on images 6-11 (images 1-12 and 6-11 scored)" in table
    assert main(["eval", str(recorded_copy), "--start", str(len(ds)), "--attacks", "clean",
                 "--no-progress"]) == 2
    assert "leaves no image" in capsys.readouterr().err


def test_a_checkpoint_without_a_recorded_dataset_asks_for_data(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint), "--attacks", "clean", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deqguard eval: error:") and "records no dataset" in err
    assert "--data fashion-mnist" in err and "Traceback" not in err


def test_default_parts_leave_out_the_hours_long_autoattack():
    from deqguard.cli import build_parser

    args = build_parser().parse_args(["eval", "default"])
    assert args.data is None
    parts = args.attacks.split(",")
    assert "aa" not in parts and "clean" in parts and "pgd" in parts


def test_the_servers_selective_fix_runs_as_printed(recorded_copy):
    """The 422 for coverage < 1 on an uncalibrated checkpoint prints a command; run it."""
    from deqguard.serving.options import OptionsError
    from deqguard.serving.torch_engine import TorchEngine

    with pytest.raises(OptionsError) as refused:
        TorchEngine.load(str(recorded_copy), device="cpu", threads=1).resolve(coverage=0.5)
    command = re.search(r"`(deqguard eval [^`]+)`", str(refused.value)).group(1)
    argv = shlex.split(command.replace("CKPT", shlex.quote(str(recorded_copy))))
    assert main(argv[1:]) == 0
    engine = TorchEngine.load(str(recorded_copy), device="cpu", threads=1)
    assert engine.resolve(coverage=0.5).coverage == 0.5  # the calibration it wrote is used


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_eval_and_detect_option_has_help_with_its_default():
    from deqguard.cli import build_parser

    commands = _subparsers(build_parser())
    detect = _subparsers(commands["detect"])
    parsers = {"eval": commands["eval"], "detect fit": detect["fit"],
               "detect evaluate": detect["evaluate"]}
    for name, parser in parsers.items():
        bare = [a.dest for a in parser._actions if not a.help]
        assert bare == [], f"{name}: options without help: {bare}"
        text = parser.format_help()
        assert not re.search(r"issue \d", text, re.IGNORECASE), name
    shown = " ".join(commands["eval"].format_help().split())  # unwrapped
    assert "aa standard AutoAttack (pyautoattack); not in the default" in shown
    assert "(default: 1000)" in shown and "(default: clean,budget,pgd,adaptive,detect)" in shown
    assert "issue" not in commands["detect"].format_help().lower()


def test_cli_spells_out_the_datasets():
    """The CLI lists them without importing torch; they must stay training.data's own."""
    from deqguard.evaluation import cli
    from deqguard.training.data import DATASETS

    assert cli.DATASETS == DATASETS
