"""bench/paired.py: the headline's three numbers paired per A:B, from the reports
`bench/headline.py --evaluate` writes; old reports without per-image outcomes refused."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def paired():
    return load_bench("paired.py")


def _settings() -> dict:
    return {"data": "fashion-mnist", "split": "test", "eps": 0.1}


def _model(root, name: str, clean: str, worst: str, aa: str) -> None:
    """A model folder with the headline's three reports, per-image outcomes given."""
    folder = root / name
    folder.mkdir()
    reports = {
        "clean-budget-n10000": {"clean": {"correct": clean}},
        "whitebox-n1000": {"clean": {"correct": clean[:4]}, "worst_case": {"correct": worst}},
        "aa-n1000": {"clean": {"correct": clean[:4]},
                     "autoattack": {"correct_after": {"clean": clean[:4], "apgd-ce": clean[:4],
                                                      "apgd-t": aa}}},
    }
    for name, body in reports.items():
        (folder / f"{name}.json").write_text(json.dumps({"settings": _settings(), **body}))


def test_one_row_per_headline_number(paired, tmp_path, capsys):
    _model(tmp_path, "a", "11111100", "1110", "1100")
    _model(tmp_path, "b", "11110000", "1000", "0110")
    assert paired.main(["--root", str(tmp_path), "a:b", "--reps", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3
    clean, worst, aa = lines[2:]
    assert clean.startswith("| a | b | clean, 10,000 | 75.0% | 50.0% | +25.0 |")
    assert worst.startswith("| a | b | worst white-box, 1,000 | 75.0% | 25.0% | +50.0 |")
    # the AutoAttack row pairs the last stage: A keeps images 1-2, B images 2-3
    assert aa.startswith("| a | b | APGD-CE + APGD-T, 1,000 | 50.0% | 50.0% | +0.0 |")
    assert "| 1 | 1 | 1.000 |" in aa


def test_refuses_old_reports_missing_files_and_bad_pairs(paired, tmp_path, capsys):
    _model(tmp_path, "a", "1111", "1110", "1100")
    _model(tmp_path, "b", "1111", "1000", "0110")
    old = tmp_path / "b" / "whitebox-n1000.json"
    old.write_text(json.dumps({"settings": _settings(), "worst_case": {"accuracy": 0.25}}))
    assert paired.main(["--root", str(tmp_path), "a:b"]) == 2
    assert "keeps no per-image worst-case" in capsys.readouterr().err
    assert paired.main(["--root", str(tmp_path), "a:c"]) == 2
    assert "c/clean-budget-n10000.json: missing" in capsys.readouterr().err
    assert paired.main(["--root", str(tmp_path), "ab"]) == 2
    assert "name a pair as A:B" in capsys.readouterr().err
