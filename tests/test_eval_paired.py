"""Paired comparison of two eval reports (`deqguard compare`): the statistics against values
computed by hand, the checks that refuse reports on different images, and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deqguard.cli import main
from deqguard.evaluation.paired import compare_reports, mcnemar_exact, paired_difference
from deqguard.evaluation.per_sample import bits, unbits


def _outcomes(both: int, only_a: int, only_b: int, neither: int, seed: int = 0):
    """Per-image outcomes with the given cell counts, in a shuffled order."""
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def test_bits_round_trip_and_refuse_other_characters():
    flags = np.array([True, False, False, True])
    assert bits(flags) == "1001" and bits([1, 0]) == "10"
    assert unbits("1001").tolist() == flags.tolist()
    with pytest.raises(ValueError, match="only '0' and '1'"):
        unbits("10x1")


def test_mcnemar_exact_against_the_binomial_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(7, 7) == 1.0  # capped: the two tails overlap at the middle


def test_paired_difference_counts_errors_and_interval():
    a, b = _outcomes(70, 10, 2, 18)
    d = paired_difference(a, b)
    assert (d.n, d.only_a, d.only_b) == (100, 10, 2)
    assert (d.accuracy_a, d.accuracy_b) == pytest.approx((0.80, 0.72))
    assert d.difference == pytest.approx(0.08)
    assert d.paired_se == pytest.approx(math.sqrt((0.12 - 0.08**2) / 100))
    assert d.unpaired_se == pytest.approx(math.sqrt((0.8 * 0.2 + 0.72 * 0.28) / 100))
    assert d.paired_se < d.unpaired_se  # the point of pairing: shared right and wrong images
    lo, hi = d.interval
    assert lo < d.difference < hi
    # a percentile interval of 10,000 resamples is about +-1.96 paired standard errors wide
    assert (hi - lo) == pytest.approx(2 * 1.96 * d.paired_se, rel=0.2)
    # the order of the images does not matter, only which images go together
    again = paired_difference(*_outcomes(70, 10, 2, 18, seed=1))
    assert (again.only_a, again.only_b, again.interval) == (d.only_a, d.only_b, d.interval)
    swapped = paired_difference(b, a)
    assert swapped.difference == pytest.approx(-d.difference) and swapped.p_value == d.p_value
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference(a, b[:-1])


def _report(clean: str, worst: str | None = None, stages: dict[str, str] | None = None, *,
            data: str = "fashion-mnist", split: str = "test", eps: float = 0.1,
            start: int | None = None) -> dict:
    r = {"settings": {"data": data, "split": split, "eps": eps}
         | ({} if start is None else {"start": start}),
         "clean": {"n": len(clean), "accuracy": unbits(clean).mean(), "correct": clean}}
    if worst is not None:
        r["worst_case"] = {"n": len(worst), "accuracy": unbits(worst).mean(), "correct": worst}
    if stages is not None:
        r["autoattack"] = {"correct_after": {"clean": clean[:len(next(iter(stages.values())))],
                                             **stages}}
    return r


def test_compare_reports_pairs_each_kept_measure_on_the_common_images():
    a = _report("11110000", "11000000", {"apgd-ce": "1100", "apgd-t": "1000"})
    b = _report("1011", "0011", {"apgd-ce": "0011", "apgd-t": "0001"})
    diffs, notes = compare_reports(a, b, reps=200)
    assert list(diffs) == ["clean", "worst-case", "aa:apgd-ce", "aa:apgd-t"]
    assert (diffs["clean"].n, diffs["clean"].only_a, diffs["clean"].only_b) == (4, 1, 0)
    assert (diffs["aa:apgd-t"].only_a, diffs["aa:apgd-t"].only_b) == (1, 1)
    assert any("clean: on the first 4 images (8 and 4 scored)" in n for n in notes)


def test_compare_reports_skips_the_first_images():
    a = _report("11110000", "11000000")
    b = _report("00001111", "11000011")
    diffs, notes = compare_reports(a, b, reps=200, skip=4)
    assert (diffs["clean"].n, diffs["clean"].only_a, diffs["clean"].only_b) == (4, 0, 4)
    assert (diffs["worst-case"].n, diffs["worst-case"].only_b) == (4, 2)
    assert diffs["worst-case"].accuracy_a == 0.0  # A's first four right answers were skipped
    short = _report("1111")
    diffs, notes = compare_reports(a, short, reps=100, skip=4)
    assert diffs == {} and "clean: left out, 4 images scored and the first 4 skipped" in notes
    with pytest.raises(ValueError, match="skip must be >= 0"):
        compare_reports(a, b, skip=-1)
    diffs, _ = compare_reports(a, b, reps=100, first=4)  # the images skip=4 left out
    assert (diffs["clean"].n, diffs["clean"].only_a, diffs["clean"].only_b) == (4, 4, 0)
    diffs, _ = compare_reports(a, b, reps=100, skip=2, first=6)
    assert (diffs["clean"].n, diffs["clean"].only_a, diffs["clean"].only_b) == (4, 2, 2)
    with pytest.raises(ValueError, match="first must be more than skip"):
        compare_reports(a, b, skip=4, first=4)


def test_compare_reports_pairs_shifted_ranges_by_image_number():
    """A report of images 5-8 (`deqguard eval --start 4 --n 4`) against one of images 1-8: only
    images 5-8 pair, each with itself; --skip and --first count from image 1 of the split."""
    a = _report("00001111", "00001100")  # images 1-8, no start recorded (older reports)
    b = _report("1010", "1000", start=4)
    diffs, notes = compare_reports(a, b, reps=200)
    assert (diffs["clean"].n, diffs["clean"].start) == (4, 4)
    assert (diffs["clean"].only_a, diffs["clean"].only_b) == (2, 0)
    assert (diffs["worst-case"].only_a, diffs["worst-case"].only_b) == (1, 0)
    assert "clean: on images 5-8 (images 1-8 and 5-8 scored)" in notes
    diffs, _ = compare_reports(a, b, reps=100, skip=6)  # images 7 and 8
    assert (diffs["clean"].n, diffs["clean"].start, diffs["clean"].only_a) == (2, 6, 1)
    diffs, _ = compare_reports(b, a, reps=100, first=6)  # images 5 and 6
    assert (diffs["clean"].n, diffs["clean"].only_a, diffs["clean"].only_b) == (2, 0, 1)
    diffs, notes = compare_reports(a, _report("11", start=8), reps=100)
    assert diffs == {} and "clean: no image in common (images 1-8 and 9-10 scored)" in notes
    assert [n for n in notes if n.startswith("clean:")] == [  # one note says it, not two
        "clean: no image in common (images 1-8 and 9-10 scored)"]


def test_compare_reports_refuses_other_images_and_leaves_out_another_threat():
    a = _report("1111", "1100")
    for other, why in ((_report("1111", data="cifar10"), "data differs"),
                       (_report("1111", split="val"), "split differs")):
        with pytest.raises(ValueError, match=why):
            compare_reports(a, other)
    with pytest.raises(ValueError, match="only reports on the test split"):
        compare_reports(_report("11", split="val"), _report("10", split="val"))
    diffs, notes = compare_reports(a, _report("1011", "1000", eps=0.2), reps=100)
    assert list(diffs) == ["clean"]  # the clean images are the same; the attacks are not
    assert notes == ["worst-case: left out, eps differs: 0.1 against 0.2"]
    _, notes = compare_reports(a, _report("1111"), reps=100)
    assert notes == ["worst-case: only in the first report"]


def test_compare_command_on_two_folders(tmp_path, capsys):
    for name, clean, worst in (("a", "1111111100", "1111000000"),
                               ("b", "1111110000", "1100000000")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "whitebox.json").write_text(json.dumps(_report(clean, worst)))
    (tmp_path / "a" / "only-here.json").write_text(json.dumps(_report("1")))
    out = tmp_path / "d.json"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out),
                 "--reps", "500"]) == 0
    table = capsys.readouterr().out
    assert "| whitebox | clean | 10 | 80.0% | 60.0% | +20.0 |" in table
    assert "| whitebox | worst-case | 10 | 40.0% | 20.0% | +20.0 |" in table
    assert "only-here" not in table  # a report only one folder holds has nothing to pair with
    rows = json.loads(out.read_text())["rows"]
    assert [(r["measure"], r["only_a"], r["only_b"]) for r in rows] == [("clean", 2, 0),
                                                                        ("worst-case", 2, 0)]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--skip", "6",
                 "--reps", "100"]) == 0
    table = capsys.readouterr().out
    assert "images 7 to 10" in table
    assert "| whitebox | clean | 4 | 50.0% | 0.0% | +50.0 |" in table
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--first", "6",
                 "--reps", "100"]) == 0
    table = capsys.readouterr().out
    assert "images 1 to 6" in table
    assert "| whitebox | clean | 6 | 100.0% | 100.0% | +0.0 |" in table
    # --first beyond what the reports scored: the header names the images paired, not the ask
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--skip", "2",
                 "--first", "50", "--reps", "100"]) == 0
    table = capsys.readouterr().out
    assert "images 3 to 10" in table and "to 50" not in table
    # measures scored on different counts (clean on 10 images, the worst case on 8): no one range
    for name, worst in (("a", "11110000"), ("b", "11000000")):
        (tmp_path / name / "whitebox.json").write_text(
            json.dumps(_report("1111111100", worst)))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--skip", "2",
                 "--reps", "100"]) == 0
    table = capsys.readouterr().out
    assert "images from 3 on, as many as each row's images column says" in table
    assert "| whitebox | clean | 8 |" in table and "| whitebox | worst-case | 6 |" in table


def test_compare_command_explains_what_it_cannot_pair(tmp_path, capsys):
    old = {"settings": {"data": "fashion-mnist", "split": "test", "eps": 0.1},
           "clean": {"n": 4, "accuracy": 0.75}}  # written before per-image outcomes were kept
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(_report("1101")))
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 2
    assert "rerun" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "bad.json"), str(tmp_path / "new.json")]) == 2
    assert "not a readable deqguard eval JSON report" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), str(tmp_path / "new.json")]) == 2
    assert "two report files or two folders" in capsys.readouterr().err
