"""bench/curves.py: training curves and a table read from train_log.jsonl, for finished runs,
runs still writing their log, and folders that are not runs (refused in one line)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def curves():
    return load_bench("curves.py")


def epoch_rows(n: int, seed: int, iterations: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"epoch": e, "global_step": 10 * e, "train_loss": float(rng.uniform(0.3, 1.5)),
             "val_clean_accuracy": round(float(rng.uniform(0.6, 0.9)), 3),
             "val_pgd_accuracy": round(float(rng.uniform(0.4, 0.8)), 3),
             "val_mean_iterations": float(rng.uniform(5, 20)) if iterations else 1.0,
             "val_converged_fraction": 1.0, "val_images": 1000, "lr": 1e-3,
             "train_seconds": float(rng.uniform(30, 900)), "val_seconds": 3.0,
             "images_per_second": 100.0} for e in range(1, n + 1)]


def write_run(folder: Path, rows: list[dict], *, final: bool, tail: str = "") -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in rows]
    if final:
        best = max(rows, key=lambda r: r["val_pgd_accuracy"])
        lines.append(json.dumps({"event": "final", "best_epoch": best["epoch"],
                                 "best_value": best["val_pgd_accuracy"]}))
    (folder / "train_log.jsonl").write_text("".join(line + "\n" for line in lines) + tail)
    return folder


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("run", "---"):
            rows[cells[0]] = cells
    return rows


def expected_cells(rows: list[dict]) -> list[str]:
    """The table's numeric cells, computed here from the rows that were written."""
    best = max(rows, key=lambda r: r["val_pgd_accuracy"])
    last = rows[-1]
    return [str(last["epoch"]), f"{100 * best['val_pgd_accuracy']:.1f}% ({best['epoch']})",
            f"{100 * last['val_clean_accuracy']:.1f}%", f"{100 * last['val_pgd_accuracy']:.1f}%",
            f"{statistics.median(r['train_seconds'] for r in rows):.0f}",
            f"{last['val_mean_iterations']:.1f}"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_table_numbers_are_the_logs(curves, tmp_path, capsys, seed):
    done_rows, live_rows = epoch_rows(12, seed), epoch_rows(5, seed + 100, iterations=False)
    done = write_run(tmp_path / "done", done_rows, final=True)
    # a run still training: no final line, and its next line only half written
    cut = json.dumps(epoch_rows(6, seed + 100)[-1])[:40]
    live = write_run(tmp_path / "live", live_rows, final=False, tail=cut)
    out = tmp_path / "fig" / "curves.svg"
    assert curves.main([str(done), str(live), "--out", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["done"][3] == "finished" and rows["done"][4:] == expected_cells(done_rows)
    assert rows["live"][3] == "in progress" and rows["live"][4:] == expected_cells(live_rows)
    svg = out.read_text()
    assert "done" in svg and "live, in progress" in svg  # both runs drawn, labelled


def test_a_weight_average_gets_its_column_and_its_dotted_line(curves, tmp_path, capsys):
    """The average starts mid-run (train.ema_decay switched on when resuming): its column is
    the best of the epochs that have it; a run without one reads n/a there."""
    rows = epoch_rows(8, 3)
    rng = np.random.default_rng(7)
    for r in rows[3:]:
        r["val_ema_clean_accuracy"] = round(float(rng.uniform(0.6, 0.9)), 3)
        r["val_ema_pgd_accuracy"] = round(float(rng.uniform(0.4, 0.8)), 3)
    averaged = write_run(tmp_path / "averaged", rows, final=False)
    plain = write_run(tmp_path / "plain", epoch_rows(4, 4), final=True)
    out = tmp_path / "c.svg"
    assert curves.main([str(averaged), str(plain), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best val PGD-10, weight average (epoch)" in printed
    table = table_rows(printed)
    best = max(rows[3:], key=lambda r: r["val_ema_pgd_accuracy"])
    assert table["averaged"][6] == f"{100 * best['val_ema_pgd_accuracy']:.1f}% ({best['epoch']})"
    assert table["plain"][6] == "n/a" and len(table["plain"]) == len(table["averaged"]) == 11
    assert "averaged, weight average" in out.read_text()


def test_png_of_a_glob_skips_folders_without_a_log_yet(curves, tmp_path, capsys):
    write_run(tmp_path / "lr" / "a", epoch_rows(3, 0), final=True)
    write_run(tmp_path / "lr" / "b", epoch_rows(2, 1), final=False)
    (tmp_path / "lr" / "starting").mkdir()  # a run before its first epoch: no log yet
    out = tmp_path / "c.png"
    assert curves.main(["--root", str(tmp_path / "lr" / "*"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert set(table_rows(captured.out)) == {"a", "b"}
    assert "skipped" in captured.err and "starting" in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make", ["empty", "missing", "no-epochs", "broken-middle", "bad-out"])
def test_refusals_are_one_line(curves, tmp_path, capsys, make):
    run = tmp_path / "run"
    args = [str(run)]
    if make == "empty":
        run.mkdir()
    elif make == "no-epochs":
        run.mkdir()
        (run / "train_log.jsonl").write_text("")
    elif make == "broken-middle":
        rows = [json.dumps(r) for r in epoch_rows(3, 0)]
        rows[1] = rows[1][:30]
        run.mkdir()
        (run / "train_log.jsonl").write_text("\n".join(rows) + "\n")
    elif make == "bad-out":
        write_run(run, epoch_rows(2, 0), final=True)
        args += ["--out", str(tmp_path / "c.pdf")]
    assert curves.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/curves.py: error: ")
    assert captured.out == ""
    assert not (tmp_path / "c.pdf").exists()


def test_a_glob_with_no_run_yet_is_skipped_unless_nothing_is_left(curves, tmp_path, capsys):
    (tmp_path / "grid" / "x").mkdir(parents=True)
    write_run(tmp_path / "done", epoch_rows(2, 0), final=True)
    grid = str(tmp_path / "grid" / "*")
    assert curves.main([str(tmp_path / "done"), "--root", grid]) == 0
    captured = capsys.readouterr()
    assert set(table_rows(captured.out)) == {"done"} and "matches no run folder" in captured.err
    assert curves.main(["--root", grid]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bench/curves.py: error: no run with a logged epoch")


def test_label_has_the_preset_and_peak_lr_from_the_checkpoint(curves, tiny_checkpoint, tmp_path,
                                                              capsys):
    from deqguard.models import update_metadata

    run = write_run(tmp_path / "regulated-x", epoch_rows(2, 0), final=True)
    ckpt = shutil.copy(tiny_checkpoint, run / "best.safetensors")
    update_metadata(ckpt, training={"preset": "fashion-wk-regulated",
                                    "config": {"optim": {"lr": 0.004}}})
    assert curves.main([str(run), "--out", str(tmp_path / "c.svg")]) == 0
    row = table_rows(capsys.readouterr().out)["regulated-x"]
    assert row[1:3] == ["fashion-wk-regulated", "0.004"]
    assert "regulated-x (fashion-wk-regulated, lr 0.004)" in (tmp_path / "c.svg").read_text()


def test_block_means_sit_side_by_side_and_round_a_tie_up(curves, tmp_path, capsys):
    """Blocks of 2 epochs: the long run's second block holds the tie 84.9 / 85.0 (mean 84.95,
    which float arithmetic prints as 84.9), the short run has half a block, then none."""
    long_rows = epoch_rows(5, 11)
    long_rows[2]["val_clean_accuracy"], long_rows[3]["val_clean_accuracy"] = 0.849, 0.85
    short_rows = epoch_rows(3, 12)
    long_run = write_run(tmp_path / "long", long_rows, final=True)
    short_run = write_run(tmp_path / "short", short_rows, final=False)
    assert curves.main([str(long_run), str(short_run), "--blocks", "2"]) == 0
    blocks = {k: v for k, v in table_rows(capsys.readouterr().out).items() if k[0].isdigit()}
    assert list(blocks) == ["1-2", "3-4", "5-6"]
    def pct(rows: list[dict], key: str) -> str:
        # the logs hold three decimals: the mean in tenths of a percent, half up, in integers
        total, n = sum(round(1000 * r[key]) for r in rows), len(rows)
        tenths = (2 * total + n) // (2 * n)
        return f"{tenths // 10}.{tenths % 10}%"

    def cells(rows: list[dict]) -> list[str]:
        iters = statistics.fmean(r["val_mean_iterations"] for r in rows)
        return [pct(rows, "val_clean_accuracy"), pct(rows, "val_pgd_accuracy"), f"{iters:.1f}"]

    assert blocks["1-2"][1:] == cells(long_rows[:2]) + cells(short_rows[:2])
    assert blocks["3-4"][1] == "85.0%"
    assert blocks["3-4"][1:4] == cells(long_rows[2:4])
    assert blocks["3-4"][4:] == [c + " (1 epoch)" for c in cells(short_rows[2:])]
    assert blocks["5-6"][1:] == [c + " (1 epoch)" for c in cells(long_rows[4:])] + ["n/a"] * 3


def test_blocks_of_no_epochs_are_refused(curves, tmp_path, capsys):
    run = write_run(tmp_path / "r", epoch_rows(2, 0), final=True)
    assert curves.main([str(run), "--blocks", "0"]) == 2
    assert "--blocks 0" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1])
def test_by_epoch_sets_the_runs_side_by_side_over_the_epochs_they_share(curves, tmp_path, capsys,
                                                                        seed):
    """A DEQ with a weight average gets three columns, a feed-forward net (one iteration an
    image) one; the rows stop at the shorter run's last epoch, and an epoch a run never logged
    reads n/a rather than a neighbour's number."""
    deq_rows = epoch_rows(9, seed)
    for r in deq_rows:
        r["val_ema_clean_accuracy"] = round(r["val_clean_accuracy"] - 0.01, 3)
        r["val_ema_pgd_accuracy"] = round(r["val_pgd_accuracy"] + 0.02, 3)
        r["val_converged_fraction"] = 0.997
    cnn_rows = [r for r in epoch_rows(6, seed + 50, iterations=False) if r["epoch"] != 4]
    deq = write_run(tmp_path / "deq", deq_rows, final=False)
    cnn = write_run(tmp_path / "cnn", cnn_rows, final=True)
    assert curves.main([str(deq), str(cnn), "--by-epoch"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("| epoch |"):].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["epoch", "deq: clean / PGD-10", "deq: weight average",
                      "deq: iterations / converged", "cnn: clean / PGD-10"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in body] == [str(e) for e in range(1, 7)]

    def pair(row: dict, prefix: str = "val_") -> str:
        return (f"{100 * row[prefix + 'clean_accuracy']:.1f} / "
                f"{100 * row[prefix + 'pgd_accuracy']:.1f}%")

    cnn_by_epoch = {r["epoch"]: r for r in cnn_rows}
    for cells, d in zip(body, deq_rows, strict=False):
        iterations = f"{d['val_mean_iterations']:.1f} / 99.7%"
        assert cells[1:4] == [pair(d), pair(d, "val_ema_"), iterations]
        c = cnn_by_epoch.get(d["epoch"])
        assert cells[4] == ("n/a" if c is None else pair(c))
