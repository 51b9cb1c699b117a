"""bench/headline.py --evaluate: a new checkpoint gets its three `deqguard eval` reports and its
table row from one command; reports already there are kept; bad specs are refused in one line."""

from __future__ import annotations

import json
import shlex
import shutil
import sys

import pytest
from conftest import load_bench

# keeps the tiny model's lines to seconds; the attacks and their images stay those of the table
FAST = ["--pgd-steps", "2", "--steps-sweep", "1,2", "--eps-sweep", "1", "--large-eps", "0.5",
        "--budgets", "1,5", "--intermediate", "1:2", "--aa-n", "4", "--batch-size", "16"]


@pytest.fixture(scope="module")
def headline():
    return load_bench("headline.py")


def test_dry_run_prints_the_documented_lines(headline, capsys):
    assert headline.main(["--evaluate", "--dry-run", "m=out/m=runs/x"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(line[:3] == ["deqguard", "eval", "runs/x/best.safetensors"]
                                   for line in lines)

    def opt(line: list[str], key: str) -> str:
        return line[line.index(key) + 1]

    clean, white, aa = lines
    assert (opt(clean, "--n"), opt(clean, "--attacks")) == ("10000", "clean,budget")
    assert (opt(white, "--n"), opt(white, "--attacks"), opt(white, "--sweep-n")) == (
        "1000", "clean,pgd,adaptive", "200")
    assert (opt(aa, "--n"), opt(aa, "--attacks"), opt(aa, "--aa-attacks")) == (
        "1000", "clean,aa", "apgd-ce,apgd-t")
    assert [opt(line, "--json") for line in lines] == [
        "out/m/clean-budget-n10000.json", "out/m/whitebox-n1000.json", "out/m/aa-n1000.json"]


def test_square_adds_a_fourth_line_and_its_column(headline, capsys, tmp_path):
    assert headline.main(["--evaluate", "--dry-run", "--square", "m=out/m=runs/x"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    square = lines[3]
    assert square[square.index("--aa-attacks") + 1] == "apgd-ce,apgd-t,square"
    assert square[square.index("--json") + 1] == "out/m/aa-square-n1000.json"
    assert square[square.index("--aa-from") + 1] == "out/m/aa-n1000.json"  # APGD not rerun

    folder = tmp_path / "m"
    folder.mkdir()
    cells = [c.strip() for c in headline.row(f"m={folder}").strip("|").split("|")]
    assert cells[7] == headline.NOT_RUN  # no fourth report: said, not filled in
    (folder / "aa-square-n1000.json").write_text(
        json.dumps({"autoattack": {"accuracy": 0.75, "n": 1000}}))
    cells = [c.strip() for c in headline.row(f"m={folder}").strip("|").split("|")]
    assert cells[7] == headline.pct(0.75, 1000) and cells[6] == headline.NOT_RUN
    assert len(cells) == headline.HEADER.splitlines()[0].count("|") - 1


def test_evaluate_runs_missing_lines_and_prints_their_numbers(headline, tiny_checkpoint,
                                                              pattern_idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = shutil.copy(tiny_checkpoint, run / "best.safetensors")
    (run / "train_log.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "train_seconds": 10.0 * e}) + "\n" for e in (1, 2, 3)))
    out = tmp_path / "reports"
    args = ["--evaluate", "--n-clean", "16", "--n-attack", "8",
            "--eval-args", shlex.join(["--data-dir", str(pattern_idx_dir), *FAST]),
            f"tiny={out}={run}"]
    assert headline.main(args) == 0
    printed = capsys.readouterr()
    full, white, aa = (json.loads((out / f"{s}.json").read_text())
                       for s in ("clean-budget-n16", "whitebox-n8", "aa-n8"))
    assert full["checkpoint"]["path"] == str(ckpt)
    assert (full["clean"]["n"], white["clean"]["n"], aa["autoattack"]["n"]) == (16, 8, 4)
    for stem in ("clean-budget-n16", "whitebox-n8", "aa-n8"):
        log = (out / f"{stem}.log").read_text()
        assert log.startswith("$ deqguard eval ") and "# exit 0, wall " in log
    row = [c.strip() for c in printed.out.splitlines()[-1].strip("|").split("|")]
    assert row[:3] == ["tiny", "3", "20"]
    assert row[3] == headline.pct(full["clean"]["accuracy"], 16)
    assert row[5] == headline.pct(white["worst_case"]["accuracy"], 8)
    assert row[6] == headline.pct(aa["autoattack"]["accuracy"], 4)
    assert "first 16 |" in printed.out and "first 8 |" in printed.out

    # A second call keeps every report (an interrupted evaluation resumes, nothing reruns).
    (out / "aa-n8.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert headline.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("is there, kept") == 2 and "aa-n8 exit 0" in err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "aa-n8.json").is_file()


def test_a_failing_line_stops_with_one_line(headline, tiny_checkpoint, tmp_path, capsys):
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "model.safetensors")
    out = tmp_path / "reports"
    rc = headline.main(["--evaluate", "--eval-args=--no-such-option",
                        f"bad={out}={ckpt}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("bench/headline.py: error: bad: deqguard eval exited")
    assert not list(out.glob("*.json")) and len(list(out.glob("*.log"))) == 1


@pytest.mark.parametrize("spec", ["only-a-name", "m=dir", "m=dir=nowhere/x.safetensors"])
def test_bad_specs_are_refused_in_one_line(headline, tmp_path, capsys, spec):
    assert headline.main(["--evaluate", spec]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/headline.py: error: ")
    assert captured.out == ""


def test_evaluate_runs_without_a_console_script_beside_the_interpreter(
        headline, tiny_checkpoint, pattern_idx_dir, tmp_path, monkeypatch, capsys):
    """An interpreter whose folder holds no `deqguard` script (a package installed into another
    prefix, as on a device image) still runs the lines, through `python -m deqguard.cli`."""
    bare = tmp_path / "bin" / "python3"
    bare.parent.mkdir()
    bare.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    bare.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bare))
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "model.safetensors")
    out = tmp_path / "reports"
    args = ["--evaluate", "--n-clean", "8", "--n-attack", "4",
            "--eval-args", shlex.join(["--data-dir", str(pattern_idx_dir), *FAST]),
            f"bare={out}={ckpt}"]
    assert headline.main(args) == 0
    assert capsys.readouterr().err.count(" exit 0, wall ") == 3
    assert {p.name for p in out.glob("*.json")} == {
        "clean-budget-n8.json", "whitebox-n4.json", "aa-n4.json"}
