"""The /ui page's examples are what their captions say: bench/ui_examples.py picks each for a role
(serving/ui/examples.py) from what the served engine returns, and the shipped ones still get
those answers from the shipped default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqguard.serving.ui import STATIC
from deqguard.serving.ui.examples import REQUIRED, ROLES, choose, fits, roles_of

REPO = Path(__file__).resolve().parents[1]
SHIPPED = STATIC / "examples"


def _answer(cls: str, suspicious: bool, abstained: bool = False) -> dict:
    return {"class_name": cls, "detection": {"suspicious": suspicious}, "abstained": abstained}


def _cand(true: str, attacked: bool, cls: str, suspicious: bool, abstained: bool) -> tuple:
    ex = {"true_class": true, "attacked": attacked}
    return ex, _answer(cls, suspicious), _answer(cls, suspicious, abstained)


def test_roles_follow_the_answers():
    assert roles_of(*_cand("a", False, "a", False, False)) == ["clean"]
    assert roles_of(*_cand("a", False, "a", False, True)) == ["abstained"]  # not answered
    assert roles_of(*_cand("a", True, "b", True, False)) == ["caught"]
    assert roles_of(*_cand("a", True, "b", False, True)) == ["missed", "abstained"]
    assert roles_of(*_cand("a", True, "a", True, False)) == []  # the attack failed
    assert roles_of(*_cand("a", False, "a", True, False)) == ["false-alarm"]
    assert roles_of(*_cand("a", False, "b", False, False)) == []  # a plain mistake
    with pytest.raises(ValueError, match="unknown example role"):
        fits("lucky", *_cand("a", False, "a", False, False))


def test_choose_fills_each_role_once_with_a_fitting_candidate():
    cands = [_cand("a", False, "a", False, True),   # 0: abstained, right guess
             _cand("a", True, "b", False, True),    # 1: missed and abstained (wrong guess)
             _cand("a", False, "a", False, False),  # 2: clean
             _cand("a", True, "b", True, False),    # 3: caught
             _cand("a", False, "c", False, True)]   # 4: abstained, wrong guess, clean image
    picked = choose(cands)
    assert picked == {"clean": 2, "caught": 3, "missed": 1, "abstained": 4}
    assert len(set(picked.values())) == len(picked)
    for role, i in picked.items():
        assert fits(role, *cands[i])
    # with only one abstention candidate, the missed attack keeps it; nothing serves twice
    assert choose(cands[1:4]) == {"clean": 1, "caught": 2, "missed": 0}


def _engine(checkpoint: str | Path):
    from deqguard.serving.factory import load_engine
    from deqguard.serving.settings import load_settings

    return load_engine(load_settings({"checkpoint": str(checkpoint), "backend": "torch",
                                      "device": "cpu", "threads": 1}))


def check_index(folder: Path, engine) -> list[str]:
    """Run the engine again on every example of folder/index.json as POST /classify would, and
    assert each recorded answer and each example's role. Returns the roles."""
    from deqguard.serving.images import decode_image

    index = json.loads((folder / "index.json").read_text())
    assert index["sha256"] == engine.meta.sha256, (
        f"{folder}/index.json was made on other weights: remake it with {index['command']}")
    coverage = index["engine"]["coverage"]
    default, at_cov = engine.resolve(), engine.resolve(coverage=coverage)
    s = engine.spec
    roles = []
    for ex in index["examples"]:
        arr = decode_image((folder / ex["file"]).read_bytes(), channels=s.channels,
                           height=s.height, width=s.width)[None]
        a = engine.classify(arr, default, trajectory=False)[0].model_dump(mode="json")
        c = engine.classify(arr, at_cov, trajectory=False)[0].model_dump(mode="json")
        for got, rec in ((a, ex["answer"]), (c, ex["answer_at_coverage"])):
            assert got["class_name"] == rec["class_name"], ex["file"]
            assert got["detection"]["suspicious"] == rec["detection"]["suspicious"], ex["file"]
            assert got["abstained"] == rec["abstained"], ex["file"]
            assert got["detection"]["score"] == pytest.approx(rec["detection"]["score"],
                                                              abs=1e-5)
        assert fits(ex["role"], ex, a, c), (ex["role"], ex["file"], a["class_name"])
        assert ex["title"] == ROLES[ex["role"]]
        assert ex["caption"].lower().startswith(ROLES[ex["role"]])
        assert "bench/ui_examples.py" in ex["caption"]
        assert ex["request"] == ({"coverage": coverage} if ex["role"] == "abstained" else {})
        roles.append(ex["role"])
    assert len(set(roles)) == len(roles)
    return roles


@pytest.fixture(scope="module")
def fixture_ckpt(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a learned detector and a selective calibration."""
    from selective_ckpt import calibrated_copy, with_detector

    path = tmp_path_factory.mktemp("ui-examples") / "tiny.safetensors"
    return calibrated_copy(with_detector(tiny_checkpoint, path), path)


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "ui_examples.py"), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_examples_made_on_a_fixture_state_what_the_engine_returns(fixture_ckpt,
                                                                  pattern_idx_dir, tmp_path):
    """The command end to end on the tiny checkpoint and pattern images: whatever roles it
    finds there, each is borne out by a fresh engine's answers, and the required ones it did
    not find are listed as missing."""
    out = tmp_path / "examples"
    run = _make("--checkpoint", str(fixture_ckpt), "--data-dir", str(pattern_idx_dir),
                "--candidates", "24", "--chunk", "12", "--coverage", "0.5", "--eps", "0.3",
                "--steps", "5", "--allow-missing", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["command"].endswith("--out " + str(out))
    roles = check_index(out, _engine(fixture_ckpt))
    assert roles, "no example at all: the fixture's images fit no role?"
    assert sorted(set(REQUIRED) - set(roles)) == sorted(index["roles_missing"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in
                                                               index["examples"])


@pytest.mark.parametrize("args, says", [
    (["--candidates", "1", "--coverage", "0.5"], "fits"),  # two candidates, four roles
    (["--candidates", "1", "--coverage", "0.01"], "--coverage 0.01"),  # under the calibration
])
def test_what_cannot_be_made_is_a_one_line_error(fixture_ckpt, pattern_idx_dir, tmp_path,
                                                 args, says):
    run = _make("--checkpoint", str(fixture_ckpt), "--data-dir", str(pattern_idx_dir), *args,
                "--out", str(tmp_path / "x"))
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ui_examples: error: ") and says in last
    assert "Traceback" not in run.stderr and not (tmp_path / "x").exists()


def test_shipped_examples_are_what_the_shipped_default_returns():
    """Every bundled example, run through the served engine on the shipped default now, gets
    the recorded answer and fits its role; all required roles are there."""
    roles = check_index(SHIPPED, _engine("default"))
    assert set(REQUIRED) <= set(roles)
