"""Feature groups of the learned detector: each prices only its own features, each is measured on
the same sets, the timing bench interleaves its variants, and a checkpoint fitted on a group is
served with exactly that group's features."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import load_bench

from deqguard.evaluation.advsets import VAL_MIX, CraftSpec, block_plan, craft
from deqguard.evaluation.choices import FEATURE_GROUPS
from deqguard.evaluation.detector_groups import (
    GROUPS,
    DetectionSets,
    collect_sets,
    group_config,
    group_configs,
    group_detection,
    markdown_table,
)
from deqguard.models.dynamics import BASELINE_FEATURES, TRAJECTORY_FEATURES, DynamicsConfig

FREE = [*BASELINE_FEATURES, *TRAJECTORY_FEATURES]


def _bench():
    return load_bench("detect_cost.py", "detect_cost")


def test_the_cli_choices_are_the_groups():
    assert FEATURE_GROUPS == tuple(GROUPS)


@pytest.mark.parametrize("name, extra, cost", [
    ("trajectory", [], 0), ("residual", ["log_residual"], 1),
    ("restart", ["restart_shift", "restart_flip", "restart_entropy"], 8),
    ("entropy-step", ["entropy_step_drop"], 4), ("jacobian", ["log_residual", "jacobian_rms"], 3),
    ("all-but-restart", ["log_residual", "jacobian_rms", "entropy_step_drop"], 7),
])
def test_each_group_computes_and_prices_only_its_own_features(name, extra, cost):
    cfg = group_config(name)
    assert sorted(cfg.names()) == sorted(FREE + extra)
    assert cfg.extra_f_evals() == cost


def test_the_full_group_is_the_default_config_and_keeps_the_base_settings():
    assert group_config("all") == DynamicsConfig()
    base = DynamicsConfig(restart_iters=5, seed=3, early_index=1)
    cfg = group_config("restart", base)
    assert (cfg.restart_iters, cfg.seed, cfg.early_index) == (5, 3, 1)
    assert group_config("entropy-step", DynamicsConfig(entropy_step=0)).entropy_step > 0
    with pytest.raises(ValueError, match="unknown feature group"):
        group_config("cheap")


def test_a_trajectory_only_solve_costs_no_f_evaluation(tiny_model, pattern_data, monkeypatch):
    """The free group must be free: no evaluation of f beyond the solve's own iterations."""
    x = torch.from_numpy(pattern_data[0][:6])
    calls = []
    layer = tiny_model.layer
    monkeypatch.setattr(tiny_model, "layer", lambda *a, **k: calls.append(1) or layer(*a, **k))
    with torch.no_grad():
        plain = tiny_model.solve(x)
        n_plain = len(calls)
        r = tiny_model.solve(x, features=group_config("trajectory"))
    assert len(calls) - n_plain == n_plain
    assert sorted(r.features) == sorted(FREE)
    assert torch.equal(r.logits, plain.logits)


def test_a_group_reads_the_same_values_as_the_full_set(tiny_model, pattern_data):
    """The bench computes features once with the full set and fits each group on its columns:
    that is only right if switching other features off changes none of a group's values."""
    x = torch.from_numpy(pattern_data[0][:6])
    cfg_all = DynamicsConfig(restart_iters=4)
    with torch.no_grad():
        full = tiny_model.solve(x, features=cfg_all).features
        for name, cfg in group_configs(cfg_all).items():
            part = tiny_model.solve(x, features=cfg).features
            assert sorted(part) == sorted(cfg.names()), name
            for k, v in part.items():
                assert torch.allclose(v, full[k], atol=1e-6), (name, k)


def test_block_plans_grow_without_recrafting_and_keep_the_validation_mix():
    small, large = block_plan(VAL_MIX, 120), block_plan(VAL_MIX, 300)
    assert large[:2] == small[:2]  # the full blocks of the small plan are the large plan's
    assert [s.count for s in small] == [50, 50, 20]
    assert [s.start for s in large] == [0, 50, 100, 150, 200, 250]
    assert [s.attack for s in large[:5]] == ["pgd", "pgd", "pgd", "pgd", "apgd-ce"]
    assert len({s.name for s in large}) == len(large)
    assert sum(s.count for s in large if s.attack == "pgd" and s.eps == 0.1) == 150


def test_the_low_entropy_attack_is_cached_apart_and_stays_in_the_ball(tiny_model, pattern_data,
                                                                      tmp_path):
    x, y = (torch.from_numpy(a[:8]) for a in pattern_data)
    low = CraftSpec("pgd-lowent", 0.1, 3, "test", 0, 8, lam=0.5)
    plain = CraftSpec("pgd", 0.1, 3, "test", 0, 8)
    assert low.name != plain.name and "lam0.5" in low.name
    assert "lam" not in plain.name
    xa = craft(tiny_model, low, x, y, tmp_path, log=lambda m: None)
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, craft(tiny_model, plain, x, y, None, log=lambda m: None))
    again = craft(tiny_model, low, x, y, tmp_path, log=lambda m: pytest.fail("recrafted"))
    assert torch.equal(xa, again)


def _synthetic_sets(seed: int = 0) -> DetectionSets:
    """Only entropy_step_drop tells attacked from clean; every other feature is noise."""
    rng = np.random.default_rng(seed)
    names = DynamicsConfig().names()

    def feats(n: int, attacked: bool, pred: np.ndarray) -> dict[str, np.ndarray]:
        f = {k: rng.normal(size=n) for k in names}
        f["entropy_step_drop"] = rng.normal(size=n) + (4.0 if attacked else 0.0)
        f["_pred"] = pred.astype(float)
        return f

    y = rng.integers(0, 4, 200)
    return DetectionSets(
        fit_clean=feats(200, False, y), fit_adv=feats(200, True, y),
        cal_clean=feats(200, False, y), test_clean=feats(200, False, y),
        test_adv={"pgd40": feats(200, True, (y + 1) % 4), "pgd40-lowent": feats(200, True, y)},
        y_test=y, described={})


def test_groups_are_told_apart_by_what_their_features_catch():
    out = group_detection(_synthetic_sets(), group_configs(), reps=50)
    assert set(out) == set(GROUPS)
    catches = out["entropy-step"]["attacks"]["pgd40"]
    assert catches["successful"]["auroc"] > 0.95 and catches["successful_flagged"] > 0.8
    blind = out["trajectory"]["attacks"]["pgd40"]
    assert abs(blind["successful"]["auroc"] - 0.5) < 0.15
    assert blind["minus_all"]["diff"] < -0.3 and blind["minus_all"]["ci"][1] < 0
    assert "minus_all" not in out["all"]["attacks"]["pgd40"]
    # the low-entropy attack fooled nothing here: measured over all inputs, no successful view
    lowent = out["trajectory"]["attacks"]["pgd40-lowent"]
    assert "successful" not in lowent and "minus_all" not in lowent
    assert lowent["all_minus_all"]["diff"] < -0.3
    assert out["entropy-step"]["extra_f_evals"] == 4
    assert "entropy_step_drop" not in out["trajectory"]["features"]
    timed = {"ms_per_answer": 2.0, "ratio": 1.5, "ratio_min": 1.2, "ratio_max": 1.7}
    paired = {"ms_per_answer": 3.0, "ratio": 1.25, "ratio_min": 1.1, "ratio_max": 1.4}
    table = markdown_table(out, {g: {"1": timed, "pair": paired} for g in GROUPS})
    head, *rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert head.endswith("| ms b1 | x plain b1 | ms pair | x plain pair |")
    assert [r.split(" | ")[0][2:] for r in rows] == list(GROUPS)
    assert all(r.endswith("| 2.00 | 1.50 (1.20-1.70) | 3.00 | 1.25 (1.10-1.40) |") for r in rows)
    assert f"{blind['minus_all']['diff']:+.3f}" in rows[0]


def test_collect_sets_crafts_once_and_reuses_the_cache(tiny_model, pattern_data, tmp_path):
    xs, ys = (torch.from_numpy(a) for a in pattern_data)

    def images(split, start, count):
        off = 0 if split == "val" else 256
        return xs[off + start:off + start + count], ys[off + start:off + start + count]

    cfg = DynamicsConfig(restart_iters=2)
    logs: list[str] = []
    kw = {"n_fit": 6, "n_cal": 6, "n_test": 5, "images": images}
    first = collect_sets(tiny_model, tmp_path, cfg, log=logs.append, **kw)
    assert any("pgd40-lowent" in m for m in logs)
    assert set(first.test_adv) == {"pgd40", "pgd40-lowent"}
    assert len(first.fit_adv["final_entropy"]) == 6 and len(first.y_test) == 5
    again = collect_sets(tiny_model, tmp_path, cfg, log=lambda m: pytest.fail(m), **kw)
    assert np.array_equal(again.test_adv["pgd40"]["final_entropy"],
                          first.test_adv["pgd40"]["final_entropy"])


class _FakeModel:
    """solve() advances a fake clock: 1 s per image, +0.5 s per image with features."""

    def __init__(self, clock):
        self.clock = clock
        self.order: list[str] = []
        self.batches: list[torch.Tensor] = []

    def solve(self, x, features=None):
        self.clock.now += len(x) * (1.5 if features is not None else 1.0)
        self.order.append("plain" if features is None else "feat")
        self.batches.append(x)


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_variants_interleaves_and_takes_ratios_within_a_round():
    bench = _bench()
    clock = _Clock()
    model = _FakeModel(clock)
    x = torch.zeros(4, 1, 2, 2)
    out = bench.time_variants(model, x, {"plain": None, "f": DynamicsConfig()}, batch_size=2,
                              rounds=3, clock=clock)
    assert out["plain"]["ms_per_answer"] == pytest.approx(1000.0)
    assert out["f"]["ratio"] == pytest.approx(1.5) and out["f"]["ratio_max"] == pytest.approx(1.5)
    assert out["plain"]["ratio"] == 1.0
    # warm-up (plain, f), then rounds rotating the order: (plain, f), (f, plain), (plain, f)
    runs = model.order[::2]  # two batches per run
    assert runs == ["plain", "feat", "plain", "feat", "feat", "plain", "plain", "feat"]
    with pytest.raises(ValueError, match="plain"):
        bench.time_variants(model, x, {"f": DynamicsConfig()}, batch_size=2, rounds=1,
                            clock=clock)


def test_time_variants_as_pairs_solves_each_image_twice_and_counts_one_answer():
    """A lone request is served as the pair [x, x]: its cost per answer is a pair's."""
    bench = _bench()
    clock = _Clock()
    model = _FakeModel(clock)
    x = torch.arange(3.0).view(3, 1, 1, 1)
    out = bench.time_variants(model, x, {"plain": None}, batch_size=1, rounds=1, clock=clock,
                              as_pairs=True)
    assert out["plain"]["ms_per_answer"] == pytest.approx(2000.0)
    assert [b.flatten().tolist() for b in model.batches[:3]] == [[0.0, 0.0], [1.0, 1.0],
                                                                  [2.0, 2.0]]


def test_a_group_fitted_detector_is_served_with_exactly_its_features(tiny_checkpoint,
                                                                     pattern_data, tmp_path):
    """What GET /model says the detector reads is what the served solve computes and scores."""
    from deqguard.evaluation.detector_fit import build_detector, compute_features
    from deqguard.models import load_checkpoint, update_metadata
    from deqguard.serving.torch_engine import TorchEngine

    model, meta = load_checkpoint(tiny_checkpoint, "cpu")
    x = torch.from_numpy(pattern_data[0][:64])
    g = torch.Generator().manual_seed(0)
    noisy = (x[:32] + 0.3 * (2 * torch.rand(x[:32].shape, generator=g) - 1)).clamp(0, 1)
    cfg = group_config("entropy-step")
    f = [compute_features(model, v, cfg) for v in (x[:32], noisy, x[32:])]
    det = build_detector(*f, cfg, model_sha256=meta.sha256)
    path = tmp_path / "group.safetensors"
    shutil.copy(tiny_checkpoint, path)
    update_metadata(path, detector=det.model_dump(mode="json"))
    engine = TorchEngine.load(str(path), device="cpu")
    described = engine.describe()["detector"]
    assert described["features"] == det.features
    assert DynamicsConfig.model_validate(described["dynamics"]) == cfg
    assert "restart_shift" not in described["features"]
    traces = engine.trace(x[:3].numpy(), engine.resolve())
    assert all(sorted(t.features) == sorted(cfg.names()) for t in traces)


@pytest.mark.parametrize("group", ["entropy-step", "all"])
def test_detect_fit_writes_a_detector_over_the_asked_group(tiny_checkpoint, pattern_data,
                                                           tmp_path, monkeypatch, group):
    from deqguard.cli import main
    from deqguard.evaluation import detector_cli
    from deqguard.evaluation.detector_fit import compute_features
    from deqguard.models import load_checkpoint, read_metadata
    from deqguard.models.learned_detector import detector_from_metadata

    model, _ = load_checkpoint(tiny_checkpoint, "cpu")
    x = torch.from_numpy(pattern_data[0][:64])
    noisy = (x[:32] + 0.3 * torch.rand(x[:32].shape, generator=torch.Generator().manual_seed(0))
             ).clamp(0, 1)
    seen = []

    def sets(model, cache, cfg, n_cal, gradient):
        seen.append(cfg)
        f = [compute_features(model, v, cfg) for v in (x[:32], noisy, x[32:])]
        return (*f, ["noise"])

    monkeypatch.setattr(detector_cli, "_val_sets", sets)
    path = tmp_path / "ckpt.safetensors"
    shutil.copy(tiny_checkpoint, path)
    main(["detect", "fit", str(path), "--cache", str(tmp_path / "c"), "--features", group,
          "--write"])
    det = detector_from_metadata(read_metadata(path))
    assert seen == [group_config(group)] and det.dynamics == group_config(group)
    assert det.training["feature_group"] == group
    assert set(det.features) <= set(group_config(group).names())


def test_detect_fit_refuses_an_unknown_group(tiny_checkpoint, capsys):
    from deqguard.cli import main

    with pytest.raises(SystemExit) as e:
        main(["detect", "fit", str(tiny_checkpoint), "--features", "cheap"])
    assert e.value.code == 2
    assert "invalid choice: 'cheap'" in capsys.readouterr().err
