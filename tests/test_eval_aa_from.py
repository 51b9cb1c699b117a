"""`deqguard eval --aa-from`: later AutoAttack stages on top of an earlier report's give the
report one run of every stage would have written, a range inside the earlier one continues its
images and merges, and reports that would not compose are refused before anything is
attacked."""

from __future__ import annotations

import json
import shutil

import pytest

from deqguard.cli import main
from deqguard.evaluation.aa_from import earlier_stages
from deqguard.evaluation.schema import EvalReport
from deqguard.models.errors import DeqguardError

COMMON = ["--n", "12", "--attacks", "clean,aa", "--batch-size", "16", "--no-progress",
          "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, pattern_idx_dir, tmp_path_factory):
    """APGD-CE alone, APGD-T added to it by --aa-from, and both stages in one run."""
    from selective_ckpt import record_dataset

    root = tmp_path_factory.mktemp("aa_from")
    ckpt = record_dataset(shutil.copy(tiny_checkpoint, root / "recorded.safetensors"),
                          pattern_idx_dir)
    paths = {name: root / f"{name}.json" for name in ("first", "added", "whole")}
    assert main(["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce",
                 "--json", str(paths["first"])]) == 0
    assert main(["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce,apgd-t",
                 "--aa-from", str(paths["first"]), "--json", str(paths["added"]),
                 "--report", str(root / "added")]) == 0
    assert main(["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce,apgd-t",
                 "--json", str(paths["whole"])]) == 0
    return ckpt, paths


def _read(path) -> EvalReport:
    return EvalReport.model_validate_json(path.read_text())


def test_added_stage_gives_the_report_of_one_run(runs):
    _, paths = runs
    first, added, whole = (_read(paths[k]) for k in ("first", "added", "whole"))
    aa, ref = added.autoattack, whole.autoattack
    assert list(aa.correct_after) == ["clean", "apgd-ce", "apgd-t"]
    assert aa.correct_after == ref.correct_after  # image for image, every stage
    assert aa.accuracy_after == pytest.approx(ref.accuracy_after)
    assert aa.accuracy == pytest.approx(ref.accuracy)
    assert added.worst_case.correct == whole.worst_case.correct
    # the first stage was taken from the earlier report, not rerun
    assert aa.seconds["apgd-ce"] == first.autoattack.seconds["apgd-ce"]
    assert aa.earlier.report == str(paths["first"]) and aa.earlier.stages == ["apgd-ce"]
    assert aa.earlier.created == first.created and aa.earlier.clean_differs == 0
    assert added.settings.aa_from == str(paths["first"]) and whole.settings.aa_from is None
    md = (paths["added"].parent / "added" / "report.md").read_text()
    assert f"apgd-ce taken from {paths['first']}" in md


def test_earlier_outcomes_are_taken_as_they_are(runs, tmp_path):
    """An image the earlier stage broke is not attacked again: marking one broken there marks
    it broken here, whatever the model does with it now."""
    ckpt, paths = runs
    report = json.loads(paths["first"].read_text())
    flags = report["autoattack"]["correct_after"]["apgd-ce"]
    kept = [i for i, f in enumerate(flags) if f == "1"]
    if not kept:
        pytest.skip("APGD-CE broke every image of the tiny model")
    i = kept[0]
    flags = flags[:i] + "0" + flags[i + 1:]
    report["autoattack"]["correct_after"]["apgd-ce"] = flags
    clean = report["autoattack"]["correct_after"]["clean"]
    report["autoattack"]["correct_after"]["clean"] = clean[:i] + "0" + clean[i + 1:]
    earlier = tmp_path / "edited.json"
    earlier.write_text(json.dumps(report))
    out = tmp_path / "added.json"
    assert main(["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce,apgd-t",
                 "--aa-from", str(earlier), "--json", str(out)]) == 0
    added = _read(out)
    aa = added.autoattack
    assert aa.earlier.clean_differs == 1  # the edited clean outcome is noticed and said
    assert any("1 images are classified otherwise clean" in w for w in added.warnings)
    assert aa.correct_after["apgd-ce"] == flags
    assert aa.correct_after["apgd-t"][i] == "0"
    assert aa.accuracy_after["apgd-ce"] == pytest.approx(flags.count("1") / len(flags))


def test_parts_of_the_earlier_range_continue_its_images_and_merge(runs, tmp_path):
    """Images 1-4 and 5-12, each continuing the 12-image report, take its outcomes for their own
    images and join into a report of the 12 that names the same earlier report."""
    ckpt, paths = runs
    first = _read(paths["first"]).autoattack
    head, tail, merged = tmp_path / "head.json", tmp_path / "tail.json", tmp_path / "all.json"
    for out, span in ((head, ["--n", "4"]), (tail, ["--start", "4", "--n", "8"])):
        assert main(["eval", str(ckpt), *COMMON, *span, "--aa-attacks", "apgd-ce,apgd-t",
                     "--aa-from", str(paths["first"]), "--json", str(out)]) == 0
    h, t = _read(head).autoattack, _read(tail).autoattack
    assert h.correct_after["apgd-ce"] == first.correct_after["apgd-ce"][:4]
    assert t.correct_after["apgd-ce"] == first.correct_after["apgd-ce"][4:]
    assert "apgd-ce" not in t.seconds and "apgd-t" in t.seconds  # its time is the whole range's
    for part in (h, t):  # the added stage only breaks images the earlier one left
        assert all(a >= b for a, b in zip(part.correct_after["apgd-ce"],
                                          part.correct_after["apgd-t"], strict=True))
    assert main(["eval-merge", str(head), str(tail), "--json", str(merged)]) == 0
    aa = _read(merged).autoattack
    assert aa.n == 12 and aa.correct_after["apgd-ce"] == first.correct_after["apgd-ce"]
    assert (aa.earlier.report, aa.earlier.stages) == (str(paths["first"]), ["apgd-ce"])


def _refusal(runs, tmp_path, capsys, edit=None, extra=()) -> str:
    ckpt, paths = runs
    earlier = paths["first"]
    if edit is not None:
        report = json.loads(earlier.read_text())
        edit(report)
        earlier = tmp_path / "edited.json"
        earlier.write_text(json.dumps(report))
    args = ["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce,apgd-t",
            "--aa-from", str(earlier), "--json", str(tmp_path / "out.json"), *extra]
    capsys.readouterr()
    assert main(args) != 0
    assert not (tmp_path / "out.json").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(("edit", "extra", "says"), [
    (lambda r: r["checkpoint"].update(sha256="0" * 64), (), "another checkpoint"),
    (lambda r: r["settings"].update(eps=0.2), (), "eps differ"),
    (lambda r: r["settings"].update(start=3), (), "images 4-15 there; this run's 1-12 are not"),
    (lambda r: r["settings"].update(aa_gradient="phantom"), (), "aa_gradient differ"),
    (lambda r: r.update(autoattack=None), (), "ran no AutoAttack"),
    (lambda r: r["autoattack"].update(correct_after=None), (), "per-image outcomes"),
    (None, ("--start", "6"), "images 1-12 there; this run's 7-18 are not among them"),
    (None, ("--aa-attacks", "apgd-t,apgd-ce"), "must begin"),
    (None, ("--aa-attacks", "apgd-ce"), "add at least one"),
    (None, ("--attacks", "clean"), "add aa to --attacks"),
    (None, ("--attacks", "clean,aa,detect"), "detect part"),
])
def test_reports_that_do_not_compose_are_refused(runs, tmp_path, capsys, edit, extra, says):
    assert says in _refusal(runs, tmp_path, capsys, edit, extra)


def test_unreadable_report_is_a_clear_error(runs, tmp_path, capsys):
    ckpt, _ = runs
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    capsys.readouterr()
    assert main(["eval", str(ckpt), *COMMON, "--aa-attacks", "apgd-ce,apgd-t",
                 "--aa-from", str(bad)]) != 0
    assert "not a readable deqguard eval report" in capsys.readouterr().err
    with pytest.raises(DeqguardError, match="not a readable"):
        earlier_stages(str(tmp_path / "missing.json"), _read(runs[1]["first"]).settings,
                       "0" * 64, 12)
