"""`deqguard eval-merge`: two runs over consecutive image ranges give the report one run over
their union would have written, and anything else is refused with the reason."""

from __future__ import annotations

import json
import shutil

import pytest

from deqguard.cli import main
from deqguard.evaluation.merge import merge_reports
from deqguard.evaluation.per_sample import unbits
from deqguard.evaluation.schema import EvalReport

COMMON = ["--attacks", "clean,aa", "--aa-attacks", "apgd-ce", "--batch-size", "16",
          "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint, pattern_idx_dir, tmp_path_factory):
    """Images 1-5 and 6-12 of the pattern data's test split, scored by one line, and a clean
    run over 1-12 to hold them against."""
    from selective_ckpt import record_dataset

    root = tmp_path_factory.mktemp("merge")
    ckpt = record_dataset(shutil.copy(tiny_checkpoint, root / "recorded.safetensors"),
                          pattern_idx_dir)
    paths = {name: root / f"{name}.json" for name in ("head", "tail", "whole")}
    assert main(["eval", str(ckpt), "--n", "5", "--json", str(paths["head"]), *COMMON]) == 0
    assert main(["eval", str(ckpt), "--start", "5", "--n", "7", "--json", str(paths["tail"]),
                 *COMMON]) == 0
    assert main(["eval", str(ckpt), "--n", "12", "--attacks", "clean", "--no-progress",
                 "--threads", "1", "--batch-size", "16", "--json", str(paths["whole"])]) == 0
    return paths


def _read(path) -> EvalReport:
    return EvalReport.model_validate_json(path.read_text())


def test_merged_parts_are_the_report_of_their_union(parts, tmp_path, capsys):
    out = tmp_path / "merged.json"
    capsys.readouterr()
    assert main(["eval-merge", str(parts["tail"]), str(parts["head"]), "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    merged, head, tail = _read(out), _read(parts["head"]), _read(parts["tail"])
    whole = _read(parts["whole"])
    assert (merged.settings.start, merged.settings.n, merged.clean.n) == (0, 12, 12)
    assert merged.clean.correct == whole.clean.correct  # the same images, in image order
    assert merged.clean.accuracy == pytest.approx(unbits(whole.clean.correct).mean())
    aa = merged.autoattack
    assert aa.n == 12 and list(aa.correct_after) == list(head.autoattack.correct_after)
    for stage, s in aa.correct_after.items():
        assert s == head.autoattack.correct_after[stage] + tail.autoattack.correct_after[stage]
        assert aa.accuracy_after[stage] == pytest.approx(unbits(s).mean())
    assert aa.accuracy == aa.accuracy_after["apgd-ce"]
    assert aa.seconds["apgd-ce"] == pytest.approx(head.autoattack.seconds["apgd-ce"]
                                                  + tail.autoattack.seconds["apgd-ce"])
    assert merged.worst_case.correct == head.worst_case.correct + tail.worst_case.correct
    assert [(p.start, p.n) for p in merged.merged_from] == [(0, 5), (5, 7)]
    assert merged.merged_from[0].report == str(parts["head"])
    # it pairs with other reports like a report one run wrote
    assert main(["compare", str(out), str(parts["whole"]), "--reps", "100"]) == 0
    assert "| merged / whole | clean | 12 |" in capsys.readouterr().out


def test_merge_refuses_what_is_not_one_line_over_one_range(parts):
    head, tail = _read(parts["head"]), _read(parts["tail"])

    def settings(r: EvalReport, **update) -> EvalReport:
        return r.model_copy(update={"settings": r.settings.model_copy(update=update)})

    cases = [
        ([head], "at least two"),
        ([head, settings(tail, start=6)], "without gap or overlap"),
        ([head, settings(tail, start=4)], "without gap or overlap"),
        ([head, settings(tail, eps=0.2)], "eps differ"),
        ([head, settings(tail, seed=1)], "seed differ"),
        ([settings(head, parts=["clean", "aa", "pgd"]), tail], "only the clean and aa parts"),
        ([head, tail.model_copy(update={"sweeps": head.sweeps or _sweeps()})], "holds sweeps"),
        ([head, tail.model_copy(update={"merged_from": [
            {"report": "x", "start": 5, "n": 7, "created": "", "seconds_total": 0.0}]})],
         "itself a merge"),
        ([head, tail.model_copy(update={"autoattack": tail.autoattack.model_copy(
            update={"n": 3})})], "--aa-n"),
    ]
    for reports, why in cases:
        with pytest.raises(ValueError, match=why):
            merge_reports(reports)


def _sweeps():
    from deqguard.evaluation.schema import Sweeps

    return Sweeps(attack="pgd", steps=[], eps=[], monotone_steps=True, monotone_eps=True,
                  large_eps_accuracy=None)


def test_merge_command_explains_bad_input(parts, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["eval-merge", str(parts["head"]), str(bad), "--json",
                 str(tmp_path / "m.json")]) == 2
    assert "not a deqguard eval JSON report" in capsys.readouterr().err
    assert main(["eval-merge", str(parts["head"]), str(parts["whole"]), "--json",
                 str(tmp_path / "m.json")]) == 2
    assert "not scored by the same line" in capsys.readouterr().err
    assert main(["eval-merge", str(parts["head"]), str(parts["tail"]), "--json",
                 str(parts["tail"])]) == 2
    assert "one of the parts" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
