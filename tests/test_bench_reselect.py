"""bench/reselect.py: it scores every saved checkpoint of a run on the validation split its
training config names, the images training chose by (the first `eval.val_limit`) apart from the
held-out rest it ranks by, never the test split, with the config's own attack; and it ranks a
useless checkpoint below a trained one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import load_bench

from deqguard.evaluation.paired import paired_difference
from deqguard.evaluation.per_sample import bits, unbits
from deqguard.models import load_checkpoint, save_checkpoint, update_metadata
from deqguard.models.errors import DeqguardError
from deqguard.training.data import load_dataset
from deqguard.training.validation import validate

VAL_SIZE = 96


@pytest.fixture(scope="module")
def reselect():
    return load_bench("reselect.py")


def _trained_config(data_dir) -> dict:
    """The parts of a training config reselect reads, as `deqguard train` records them."""
    return {"config": {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "val_size": VAL_SIZE,
                 "split_seed": 3, "image_size": None},
        "eval": {"batch_size": 40, "val_limit": 16, "eps": 0.03, "steps": 2,
                 "step_size": 0.01}}}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_checkpoint, pattern_idx_dir):
    """A run folder as training leaves it: best (the trained fixture) and last (its weights
    zeroed: one constant answer), both recording a training config over the pattern files."""
    folder = tmp_path_factory.mktemp("run")
    shutil.copyfile(tiny_checkpoint, folder / "best.safetensors")
    update_metadata(folder / "best.safetensors", training=_trained_config(pattern_idx_dir),
                    metrics={"epoch": 7, "val_images": 16, "val_pgd_accuracy": 0.5})
    model, meta = load_checkpoint(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    save_checkpoint(model, folder / "last.safetensors",
                    {"name": "zeroed", "classes": meta.classes,
                     "training": _trained_config(pattern_idx_dir), "metrics": {"epoch": 9}})
    return folder


def _spy_on_validate(reselect, monkeypatch) -> list:
    """(indices, images) of each validate() call reselect makes from now on, in order."""
    scored = []

    def spy(model, loader, **kw):
        subset = loader.dataset
        scored.append((list(subset.indices), torch.stack([subset[i][0] for i in
                                                          range(len(subset))])))
        return validate(model, loader, **kw)

    monkeypatch.setattr(reselect, "validate", spy)
    return scored


def test_candidates_are_the_files_a_run_saved(reselect, run_folder, tmp_path):
    assert reselect.candidates([str(run_folder)]) == [run_folder / "best.safetensors",
                                                     run_folder / "last.safetensors"]
    single = run_folder / "last.safetensors"
    assert reselect.candidates([str(single)]) == [single]
    with pytest.raises(DeqguardError, match="no best.safetensors"):
        reselect.candidates([str(tmp_path)])
    with pytest.raises(DeqguardError, match="no such checkpoint"):
        reselect.candidates([str(tmp_path / "missing")])


def test_scores_held_out_validation_images_apart_with_the_recorded_attack(
        reselect, run_folder, pattern_idx_dir, monkeypatch):
    scored = _spy_on_validate(reselect, monkeypatch)
    row = reselect.revalidate(run_folder / "best.safetensors", seed=0, device=torch.device("cpu"))
    assert row["selection"]["images"] == 16  # eval.val_limit: what training chose the epoch by
    assert row["held_out"]["images"] == VAL_SIZE - 16  # the rest of the split, ranked by
    assert row["attack"] == {"eps": 0.03, "step_size": 0.01, "steps": 2, "seed": 0,
                             "start": "uniform", "gradient": "model default"}
    assert row["epoch"] == 7 and row["trained_val_pgd_accuracy"] == 0.5

    # Clean accuracy counted independently on the held-out images (split seed and size as
    # recorded): the split is rebuilt as training carved it, and cut after the selection images.
    split = load_dataset("fashion-mnist", "val", data_dir=pattern_idx_dir, val_size=VAL_SIZE,
                         seed=3)
    x = torch.stack([split[i][0] for i in range(16, len(split))])
    # The two parts are the split's first 16 images and the other 80, in the split's order.
    assert [indices for indices, _ in scored] == [list(range(16)), list(range(16, VAL_SIZE))]
    assert torch.equal(scored[1][1], x)
    y = torch.tensor([int(split[i][1]) for i in range(16, len(split))])
    model, _ = load_checkpoint(run_folder / "best.safetensors", device="cpu")
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    held = row["held_out"]
    assert held["clean_accuracy"] == pytest.approx(expected)
    assert held["pgd_accuracy"] <= held["clean_accuracy"]
    # and image by image, in the split's order, as the strings reports keep
    with torch.no_grad():
        assert held["clean_correct"] == bits(model(x).argmax(1) == y)
    pgd = unbits(held["pgd_correct"])
    assert pgd.size == len(y) and pgd.mean() == pytest.approx(held["pgd_accuracy"])


def test_no_held_out_image_is_refused(reselect, run_folder, pattern_idx_dir, tmp_path):
    path = tmp_path / "all-seen.safetensors"
    shutil.copyfile(run_folder / "best.safetensors", path)
    config = _trained_config(pattern_idx_dir)
    config["config"]["eval"]["val_limit"] = VAL_SIZE
    update_metadata(path, training=config)
    with pytest.raises(DeqguardError, match="none is held out"):
        reselect.revalidate(path, seed=0, device=torch.device("cpu"))


def test_ranks_a_useless_checkpoint_last_and_writes_the_rows(reselect, run_folder, tmp_path,
                                                              capsys):
    out = tmp_path / "rows.json"
    assert reselect.main([str(run_folder), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["checkpoint"].rsplit("/", 1)[1] for r in rows] == ["best.safetensors",
                                                                 "last.safetensors"]
    assert rows[0]["held_out"]["pgd_accuracy"] > rows[1]["held_out"]["pgd_accuracy"]
    table = capsys.readouterr().out
    assert table.index("best.safetensors") < table.index("last.safetensors")


def test_a_checkpoint_without_a_training_config_is_refused_clearly(reselect, tiny_checkpoint,
                                                                   capsys):
    assert reselect.main([str(tiny_checkpoint)]) == 2
    assert "records no training config" in capsys.readouterr().err


def test_training_images_are_scored_after_validation_and_change_nothing_else(
        reselect, run_folder, pattern_idx_dir, monkeypatch):
    """`--train N` adds the first N images of the training split, the ones gradient steps
    fitted (unaugmented), scored last so the validation parts' attack draws are unchanged."""
    path = run_folder / "best.safetensors"
    plain = reselect.revalidate(path, seed=0, device=torch.device("cpu"))
    scored = _spy_on_validate(reselect, monkeypatch)
    row = reselect.revalidate(path, seed=0, device=torch.device("cpu"), train_images=24)
    train = load_dataset("fashion-mnist", "train", data_dir=pattern_idx_dir, val_size=VAL_SIZE,
                         seed=3)
    assert len(scored) == 3 and torch.equal(scored[2][1],
                                            torch.stack([train[i][0] for i in range(24)]))
    assert row["train"]["images"] == 24
    for part in ("selection", "held_out"):
        assert row[part] == plain[part]
    table = reselect.table([row])
    assert "training images' clean / PGD-2, 24" in table.splitlines()[0]
    cells = table.splitlines()[2].split(" | ")
    expected = (f"{100 * row['train']['clean_accuracy']:.1f}% / "
                f"{100 * row['train']['pgd_accuracy']:.1f}%")
    assert cells[4] == expected
    assert table.splitlines()[1].count("---:") == 9
    # without it the table keeps its columns as before
    assert "training images" not in reselect.table([plain])
    assert reselect.table([plain]).splitlines()[1] == "|---|" + "---:|" * 8


def test_training_images_are_only_those_the_run_trained_on(reselect, run_folder, tmp_path,
                                                            pattern_idx_dir):
    """A run trained on the first `data.limit` images: --train never scores beyond them."""
    path = tmp_path / "limited.safetensors"
    shutil.copyfile(run_folder / "best.safetensors", path)
    config = _trained_config(pattern_idx_dir)
    config["config"]["data"]["limit"] = 10
    update_metadata(path, training=config)
    row = reselect.revalidate(path, seed=0, device=torch.device("cpu"), train_images=24)
    assert row["train"]["images"] == 10


def test_a_negative_training_count_is_refused(reselect, run_folder, capsys):
    with pytest.raises(SystemExit):
        reselect.main([str(run_folder), "--train", "-1"])
    assert "count of images" in capsys.readouterr().err


def test_paired_rows_compare_each_checkpoint_with_the_first_image_by_image(
        reselect, run_folder, pattern_idx_dir, tmp_path, capsys):
    """--paired: best (the first found) against last on the held-out images, the counts taken
    from the rows' outcomes; a checkpoint whose recorded split differs is not paired."""
    other = tmp_path / "other-split.safetensors"
    shutil.copyfile(run_folder / "best.safetensors", other)
    config = _trained_config(pattern_idx_dir)
    config["config"]["data"]["split_seed"] = 4  # other images in its validation split
    update_metadata(other, training=config)
    out = tmp_path / "rows.json"
    assert reselect.main([str(run_folder), str(other), "--paired", "--json", str(out)]) == 0
    rows = {r["checkpoint"].rsplit("/", 1)[1]: r for r in json.loads(out.read_text())["rows"]}
    best, last = rows["best.safetensors"]["held_out"], rows["last.safetensors"]["held_out"]
    text = capsys.readouterr().out
    paired = text[text.index("Paired against"):].splitlines()
    assert str(run_folder / "best.safetensors") in paired[0]
    lines = [line for line in paired if line.startswith(f"| {run_folder / 'last.safetensors'}")]
    assert [line.split(" | ")[1] for line in lines] == ["clean", "PGD"]
    for line, key in zip(lines, ("clean_correct", "pgd_correct"), strict=True):
        d = paired_difference(unbits(last[key]), unbits(best[key]))
        cells = line.split(" | ")
        assert cells[4] == f"{100 * d.difference:+.1f}"
        assert cells[6] == f"{d.only_a} / {d.only_b}"
    # the zeroed weights answer one class: they lose images the trained fixture gets right
    assert paired_difference(unbits(last["clean_correct"]),
                             unbits(best["clean_correct"])).only_b > 0
    assert f"| {other} | not the same images |" in text
