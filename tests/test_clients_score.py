"""`deqguard score`: rows, error rows, labels and accuracy, output formats, resumption, engines."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_pattern_images
from PIL import Image
from selective_ckpt import calibrated_copy

from deqguard.cli import main
from deqguard.clients.files import find_images
from deqguard.clients.rows import COLUMNS, read_rows

N_IMAGES = 200
CORRUPT = ("shape1/truncated.png", "shape2/not-an-image.jpg")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, n: int = N_IMAGES, *, labelled: bool = True, seed: int = 1) -> Path:
    """n pattern PNGs (in class folders when labelled) plus two files that cannot be decoded."""
    x, y = make_pattern_images(n, seed=seed)
    for i in range(n):
        sub = root / CLASSES[y[i]] if labelled else root / f"batch{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:04d}.png").write_bytes(_png((x[i, 0] * 255).round().astype(np.uint8)))
    if labelled:
        good = _png((x[0, 0] * 255).astype(np.uint8))
        (root / CORRUPT[0]).write_bytes(good[: len(good) // 2])
        (root / CORRUPT[1]).write_bytes(b"this is text, not a JPEG\n" * 4)
        (root / "shape0" / "README.txt").write_text("not an image extension: ignored")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


def score(*args: str) -> int:
    return main(["score", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def local_jsonl(image_dir, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "local.jsonl"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--batch-size", 16,
                 "--workers", 1) == 0
    return out


def test_one_row_per_file_with_labels_and_error_rows(local_jsonl, image_dir, tiny_checkpoint):
    from deqguard.models import read_metadata

    rows = read_rows(local_jsonl)
    files = find_images(image_dir)
    assert len(files) == N_IMAGES + len(CORRUPT)
    assert [r["path"] for r in rows] == files  # sorted, each once
    assert all(set(r) == set(COLUMNS) for r in rows)
    sha = read_metadata(tiny_checkpoint).sha256
    assert {r["model_sha256"] for r in rows} == {sha}
    bad = {r["path"]: r for r in rows if r["error"] is not None}
    assert set(bad) == set(CORRUPT)
    for r in bad.values():
        assert r["pred"] is None and r["entropy"] is None and r["label"] is not None
    good = [r for r in rows if r["error"] is None]
    for r in good:
        assert r["label"] == CLASSES.index(r["path"].split("/")[0])
        assert r["class_name"] == CLASSES[r["pred"]]
        assert 0.25 <= r["confidence"] <= 1.0
        assert len(r["entropy"]) == r["iterations"] >= 1
        assert isinstance(r["converged"], bool) and isinstance(r["suspicious"], bool)
        assert r["detection_score"] == pytest.approx(r["entropy"][-1], abs=1e-4)
    acc = np.mean([r["pred"] == r["label"] for r in good])
    assert acc > 0.9  # the tiny checkpoint learnt the patterns


def test_summary_reports_rows_errors_and_accuracy(image_dir, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    text = capsys.readouterr().out
    rows = read_rows(out)
    good = [r for r in rows if r["error"] is None]
    correct = sum(r["pred"] == r["label"] for r in good)
    assert f"rows: {len(rows)}" in text
    assert f"errors: {len(CORRUPT)}" in text
    assert f"accuracy: {correct / len(good):.4f} ({correct}/{len(good)}" in text
    assert (f"answered: {len(good)} of {len(rows)} images (errors: {len(CORRUPT)}, files that "
            "could not be scored)") in text


def test_unlabelled_folder_has_null_labels_and_no_accuracy(tiny_checkpoint, tmp_path, capsys):
    root = write_folder(tmp_path / "flat", 12, labelled=False)
    out = tmp_path / "flat.csv"
    assert score(root, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    rows = read_rows(out)
    assert len(rows) == 12 and all(r["label"] is None and r["error"] is None for r in rows)
    printed = capsys.readouterr()
    assert "accuracy" not in printed.out
    # Folders that look like nothing the model knows are said, not silently left unlabelled.
    warning = printed.err.strip()
    assert warning.startswith("deqguard score: warning: no image gets a label")
    assert "(batch0/, batch1/, batch2/)" in warning and len(warning.splitlines()) == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_each_format_reads_back_the_same_rows(local_jsonl, image_dir, tiny_checkpoint, tmp_path,
                                              suffix):
    out = tmp_path / f"rows{suffix}"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--batch-size", 16,
                 "--workers", 0) == 0
    assert read_rows(out) == read_rows(local_jsonl)


def test_parquet_keeps_the_trajectory_as_a_list_column(local_jsonl, image_dir, tiny_checkpoint,
                                                       tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "rows.parquet"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    schema = pq.read_schema(out)
    assert pa.types.is_list(schema.field("entropy").type)
    assert schema.field("label").type == pa.int64()


def test_csv_stores_the_trajectory_as_json(local_jsonl, image_dir, tiny_checkpoint, tmp_path):
    import csv
    import json

    out = tmp_path / "rows.csv"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    with out.open() as fh:
        first = next(r for r in csv.DictReader(fh) if r["error"] == "")
    assert isinstance(json.loads(first["entropy"]), list)


def test_rows_built_in_other_processes_are_the_same(local_jsonl, image_dir, tiny_checkpoint,
                                                     tmp_path):
    # The GPU default (row-building processes beside the model), checked here on CPU.
    from deqguard.clients.score import ScoreConfig, score_folder

    out = tmp_path / "pool.jsonl"
    cfg = ScoreConfig(input_dir=str(image_dir), out=str(out), checkpoint=str(tiny_checkpoint),
                      batch_size=16, workers=0, row_workers=1, progress=False)
    assert score_folder(cfg).rows == N_IMAGES + len(CORRUPT)
    assert read_rows(out) == read_rows(local_jsonl)


def test_rerun_of_a_finished_output_scores_nothing_and_keeps_rows(image_dir, tiny_checkpoint,
                                                                  tmp_path, capsys):
    out = tmp_path / "again.jsonl"
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0) == 0
    assert "(0 scored in this run" in capsys.readouterr().out
    assert out.read_bytes() == before


def test_unfinished_run_with_other_options_is_refused(image_dir, tiny_checkpoint, tmp_path,
                                                      capsys):
    out = tmp_path / "mixed.jsonl"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "run.json").write_text('{"options": {"max_iter": 3}}')
    code = score(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--workers", 0)
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("small"), 12, seed=2)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory) -> Path:
    """The fixture checkpoint with a selective calibration, so --coverage below 1 is accepted."""
    return calibrated_copy(tiny_checkpoint, tmp_path_factory.mktemp("cal") / "tiny.safetensors")


# (output, first options, other options, how the refusal names the difference)
RERUNS = [
    (".parquet", ["--coverage", "0.9"], ["--coverage", "0.5"], "--coverage was 0.9, now 0.5"),
    (".csv", ["--max-iter", "3"], ["--max-iter", "1", "--solver", "naive"],
     "--max-iter was 3, now 1; --solver was not given, now naive"),
    (".jsonl", ["--solver", "anderson"], ["--solver", "naive"],
     "--solver was anderson, now naive"),
]


@pytest.mark.parametrize(("suffix", "first", "other", "said"), RERUNS,
                         ids=[r[0][1:] for r in RERUNS])
def test_finished_output_refuses_other_options_until_overwrite(
        suffix, first, other, said, small_dir, calibrated, tmp_path, capsys):
    out = tmp_path / f"scores{suffix}"
    common = [small_dir, "--checkpoint", calibrated, "--workers", 0, "--out"]
    assert score(*common, out, *first) == 0
    before = out.read_bytes()
    capsys.readouterr()

    assert score(*common, out, *other) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("deqguard score: error: ")
    assert said in err and "--overwrite" in err and "another --out" in err
    assert out.read_bytes() == before
    assert not out.with_name(out.name + ".parts").exists()

    assert score(*common, out, *first) == 0  # the same options: nothing to do, rows kept
    assert "(0 scored in this run" in capsys.readouterr().out
    assert out.read_bytes() == before

    assert score(*common, out, *other, "--overwrite") == 0
    fresh = tmp_path / f"fresh{suffix}"
    assert score(*common, fresh, *other) == 0
    assert read_rows(out) == read_rows(fresh)  # the new options' rows, none of the old ones
    assert score(*common, out, *first) == 2  # and the output now records the new options


@pytest.mark.parametrize("given", [["--coverage", "1"], ["--defense", "none"]],
                         ids=["coverage-1", "defense-none"])
def test_an_option_given_at_its_absent_meaning_is_the_same_run(
        given, small_dir, calibrated, tmp_path, capsys):
    """`--coverage 1` answers exactly as no --coverage, so it resumes rather than refuses."""
    out = tmp_path / "scores.jsonl"
    common = [small_dir, "--checkpoint", calibrated, "--workers", 0, "--out", out]
    assert score(*common) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert score(*common, *given) == 0
    assert "(0 scored in this run" in capsys.readouterr().out
    assert out.read_bytes() == before


def test_output_without_a_record_is_not_reused(small_dir, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "old.csv"
    common = [small_dir, "--checkpoint", tiny_checkpoint, "--workers", 0, "--out", out]
    assert score(*common) == 0
    side = out.with_name(out.name + ".run.json")
    assert json.loads(side.read_text())["options"] == {}
    side.unlink()  # as an output written before outputs kept their settings
    before = out.read_bytes()
    capsys.readouterr()
    assert score(*common) == 2
    err = capsys.readouterr().err
    assert "holds no record of the model and options" in err and "--overwrite" in err
    assert out.read_bytes() == before


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_output_records_model_and_input_and_refuses_others(suffix, tmp_path):
    from deqguard.clients.files import Item
    from deqguard.clients.output import ResumableOutput, ScoreError
    from deqguard.clients.rows import error_row

    out = tmp_path / f"rows{suffix}"
    made = {"input_dir": "/data/a", "model_sha256": "a" * 64, "options": {"coverage": 0.9}}
    first = ResumableOutput(out, made)
    assert first.open() == []
    first.add([error_row(Item("x.png", "/data/a/x.png", None), "bad", "a" * 64)])
    first.finish(["x.png"])
    before = out.read_bytes()

    for change, said in [({"model_sha256": "b" * 64}, "model sha256 was aaaaaaaaaaaa, now "
                          "bbbbbbbbbbbb"),
                         ({"input_dir": "/data/b"}, "input folder was /data/a, now /data/b")]:
        with pytest.raises(ScoreError, match="--overwrite") as exc:
            ResumableOutput(out, {**made, **change}).open()
        assert said in str(exc.value)
        assert out.read_bytes() == before
    again = ResumableOutput(out, json.loads(json.dumps(made)))
    assert [r["path"] for r in again.open()] == ["x.png"]  # the same settings: resumed


def test_every_score_option_has_help_with_its_default():
    from deqguard.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    score_parser = sub.choices["score"]
    missing, no_default = [], []
    for action in score_parser._actions:
        if action.dest == "help":
            continue
        if not action.help:
            missing.append(action.dest)
        elif action.option_strings and "default" not in action.help and not action.required:
            no_default.append(action.dest)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not say the default: {no_default}"
    text = score_parser.format_help()
    assert "(default: 64)" in text and "(default: 512)" in text and "(default: 16)" in text
    assert "T-shirt_top" in text


def test_summary_says_how_many_were_answered_and_why_not(small_dir, calibrated, tmp_path,
                                                        capsys):
    out = tmp_path / "sel.jsonl"
    assert score(small_dir, "--checkpoint", calibrated, "--workers", 0, "--out", out,
                 "--coverage", "0.5") == 0
    text = capsys.readouterr().out
    rows = read_rows(out)
    abstained = sum(bool(r["abstained"]) for r in rows if r["error"] is None)
    answered = len(rows) - len(CORRUPT) - abstained
    reason = ", where the model was not sure enough" if abstained else ""
    assert (f"answered: {answered} of {len(rows)} images (abstained: {abstained}{reason} at "
            f"coverage 0.5; errors: {len(CORRUPT)}, files that could not be scored)") in text


SLASH_CLASSES = ["T-shirt/top", "Trouser", "Ankle boot", "Bag"]
# The documented folder for each class, written as a user might: any case, a space as "_".
SLASH_FOLDERS = ["T-shirt_top", "trouser", "ankle_boot", "Bag"]


@pytest.fixture(scope="module")
def slash_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The fixture checkpoint under Fashion-MNIST-like class names, one with a "/"."""
    from deqguard.models import update_metadata

    path = tmp_path_factory.mktemp("slash") / "tiny.safetensors"
    shutil.copy(tiny_checkpoint, path)
    update_metadata(path, classes=SLASH_CLASSES)
    return path


def test_class_names_with_a_slash_label_their_safe_folders(slash_checkpoint, tmp_path, capsys):
    root = tmp_path / "fashion"
    x, y = make_pattern_images(24, seed=4)
    for i in range(len(y)):
        sub = root / SLASH_FOLDERS[y[i]]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.png").write_bytes(_png((x[i, 0] * 255).round().astype(np.uint8)))
    (root / "misc").mkdir()
    (root / "misc" / "extra.png").write_bytes(_png((x[0, 0] * 255).round().astype(np.uint8)))
    out = tmp_path / "fashion.parquet"
    assert score(root, "--checkpoint", slash_checkpoint, "--workers", 0, "--out", out) == 0
    rows = read_rows(out)
    assert len(rows) == len(y) + 1
    for r in rows:
        top = r["path"].split("/")[0]
        want = None if top == "misc" else SLASH_FOLDERS.index(top)
        assert r["label"] == want, r["path"]
    printed = capsys.readouterr()
    assert "accuracy: " in printed.out and f"/{len(y)} labelled images" in printed.out
    warning = printed.err.strip()
    assert warning.startswith("deqguard score: warning: images under misc/ get no label")
    assert len(warning.splitlines()) == 1
    assert not any(f"{f}/" in warning for f in SLASH_FOLDERS)


def test_bad_output_suffix_is_refused_before_any_work(image_dir, tiny_checkpoint, tmp_path, capsys):
    assert score(image_dir, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "x.xlsx") == 2
    assert ".parquet, .csv or .jsonl" in capsys.readouterr().err


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "deqguard.cli", "score", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def test_sigkill_then_rerun_gives_every_file_exactly_once(image_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "killed.parquet"
    parts = out.with_name(out.name + ".parts")
    # Slow on purpose (naive solver, tight tol, many steps) so the kill lands mid-run.
    args = [image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--batch-size", 8,
            "--chunk-rows", 16, "--solver", "naive", "--max-iter", 60, "--tol", 1e-9,
            "--workers", 1, "--quiet"]
    proc = _cli(*args, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.jsonl")):
        assert proc.poll() is None, f"finished before a kill could land: {proc.communicate()}"
        assert time.monotonic() < deadline, "no part was flushed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    flushed = sum(len(read_rows(p, "jsonl")) for p in parts.glob("part-*.jsonl"))
    assert 0 < flushed < N_IMAGES

    rerun = _cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    scored_now = int(stdout.split("(")[1].split()[0])
    assert scored_now == N_IMAGES + len(CORRUPT) - flushed  # the flushed rows were skipped
    rows = read_rows(out)
    assert [r["path"] for r in rows] == find_images(image_dir)
    assert {r["path"] for r in rows if r["error"]} == set(CORRUPT)
    assert all(r["pred"] is not None and r["entropy"] for r in rows if not r["error"])
    assert not parts.exists()


@pytest.mark.slow  # 25-55 s on the shared 2-core box: Ray's start-up dominates
def test_ray_engine_gives_the_same_rows_as_local(local_jsonl, image_dir, tiny_checkpoint,
                                                 tmp_path):
    out = tmp_path / "ray.jsonl"
    proc = _cli(image_dir, "--checkpoint", tiny_checkpoint, "--out", out, "--engine", "ray",
                "--batch-size", 16, "--quiet")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert read_rows(out) == read_rows(local_jsonl)


def test_url_scoring_agrees_with_local(served_url, local_jsonl, image_dir, tmp_path):
    out = tmp_path / "http.jsonl"
    assert score(image_dir, "--url", served_url, "--out", out, "--concurrency", 8) == 0
    local, remote = read_rows(local_jsonl), read_rows(out)
    assert [r["path"] for r in remote] == [r["path"] for r in local]
    for a, b in zip(local, remote, strict=True):
        assert (a["error"] is None) == (b["error"] is None), (a, b)
        assert (a["label"], a["pred"], a["class_name"], a["model_sha256"]) == (
            b["label"], b["pred"], b["class_name"], b["model_sha256"])
        if a["error"] is None:
            assert a["iterations"] == b["iterations"] and a["converged"] == b["converged"]
            assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-4)
            assert b["entropy"] == pytest.approx(a["entropy"], abs=1e-4)
            assert b["detection_score"] == pytest.approx(a["detection_score"], abs=1e-4)
    assert {r["path"] for r in remote if r["error"]} == set(CORRUPT)
