"""bench/recipes.py: every grid entry is a training command that would start.

A misspelt override or a warm start from a file that is not there only shows once a runner
reaches that entry, possibly hours into a grid; building each entry's config here finds it at
once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_bench

from deqguard.training.config import ConfigError, build_config
from deqguard.training.data import DatasetInfo
from deqguard.training.run_setup import model_config_for

ROOT = Path(__file__).resolve().parents[1]
GRIDS = load_bench("recipes.py").GRIDS
ENTRIES = [(grid, name, preset, sets) for grid, table in GRIDS.items()
           for name, (preset, sets) in table.items()]
# the PGD-AT runs of the lr grid that the recipe grids are compared with
BASELINES = {"regulated": GRIDS["lr"]["regulated-lr1.6e-2"],
             "anchor": GRIDS["lr"]["anchor-lr1e-2"]}


def added_keys(sets: list[str], base_sets: list[str]) -> list[str]:
    """The config keys an entry sets beyond its baseline, sorted."""
    return sorted(s.split("=")[0] for s in set(sets) - set(base_sets))


@pytest.mark.parametrize(("grid", "name", "preset", "sets"), ENTRIES,
                         ids=[f"{g}/{n}" for g, n, _, _ in ENTRIES])
def test_every_entry_builds_a_valid_config(grid, name, preset, sets):
    cfg = build_config(preset, sets)
    source = cfg.train.init_from
    if source is not None:
        assert (ROOT / source).is_file(), f"{grid}/{name} warm-starts from a missing {source}"


def test_a_misspelt_override_is_refused():
    with pytest.raises(ConfigError, match="clean_wieght"):
        build_config("fashion-wk-regulated", ["objective.clean_wieght=0.5"])


def test_the_clean_grid_differs_from_its_baselines_only_by_the_clean_weight():
    assert sorted(GRIDS["clean"]) == ["anchor-clean0.25", "anchor-clean0.5",
                                      "regulated-clean0.25", "regulated-clean0.5"]
    for name, (preset, sets) in GRIDS["clean"].items():
        base_preset, base_sets = BASELINES[name.split("-")[0]]
        assert preset == base_preset
        assert added_keys(sets, base_sets) == ["objective.clean_weight", "train.amp"], name
        cfg = build_config(preset, sets)
        assert cfg.objective.clean_weight > 0 and cfg.train.amp == "off"


def test_each_borrowed_rate_is_searched_on_its_own_model():
    """The expansion-2 and plain DEQs' rate entries differ only in the rate, inside each model."""
    for model, preset, expansion in (("x2", "fashion-wk-regulated", 2),
                                     ("plain", "fashion-wk-plain", 1)):
        entries = {n: v for n, v in GRIDS["lr"].items() if n.startswith(f"{model}-lr")}
        configs = [build_config(preset_, sets) for preset_, sets in entries.values()]
        assert {p for p, _ in entries.values()} == {preset}
        assert len({tuple(s for s in sets if not s.startswith("optim.lr="))
                    for _, sets in entries.values()}) == 1
        assert sorted(c.optim.lr for c in configs) == [8e-3, 1.6e-2, 3.2e-2]
        for cfg in configs:
            assert cfg.model.overrides.get("expansion", 1) == expansion
            assert cfg.train.amp == "off" and cfg.train.channels_last


def test_the_trades_grid_differs_from_its_baselines_only_by_the_objective():
    betas = []
    trades = {n: v for n, v in GRIDS["trades"].items() if n != "regulated-pgd-at"}
    control_preset, control_sets = GRIDS["trades"]["regulated-pgd-at"]
    assert control_preset == BASELINES["regulated"][0]
    assert sorted(set(control_sets) - set(BASELINES["regulated"][1])) == ["train.amp=off"]
    for name, (preset, sets) in trades.items():
        base_preset, base_sets = BASELINES[name.split("-")[0]]
        assert preset == base_preset
        assert added_keys(sets, base_sets) == ["objective.beta", "objective.kind", "train.amp"]
        cfg = build_config(preset, sets)
        assert cfg.objective.kind == "trades" and cfg.train.amp == "off"
        assert cfg.objective.steps == build_config(base_preset, base_sets).objective.steps
        betas.append(cfg.objective.beta)
    assert sorted(betas) == [1.0, 3.0, 3.0, 6.0, 6.0]


def test_the_width_grid_doubles_each_model_and_changes_nothing_else():
    """The capacity probe is read against the lr grid's runs: only the width may differ, and
    the rate in the entries that bracket the narrow model's rate for the wide one."""
    shape = DatasetInfo([str(i) for i in range(10)], 1, 28)  # Fashion-MNIST's
    assert sorted(GRIDS["width"]) == [
        "anchor-w2", "anchor-w2-lr2.5e-3", "anchor-w2-lr2e-2", "anchor-w2-lr5e-3",
        "regulated-w2", "regulated-w2-lr3.2e-2", "regulated-w2-lr8e-3"]
    width_keys = ["model.overrides.channels", "model.overrides.hidden", "train.amp",
                  "train.channels_last"]
    for name, (preset, sets) in GRIDS["width"].items():
        base_preset, base_sets = BASELINES[name.split("-")[0]]
        assert preset == base_preset
        bracket = "-lr" in name
        assert added_keys(sets, base_sets) == sorted(
            width_keys + (["optim.lr"] if bracket else [])), name
        wide, base = build_config(preset, sets), build_config(base_preset, base_sets)
        ratio = {"2.5e-3": 0.25, "8e-3": 0.5, "5e-3": 0.5, "2e-2": 2.0, "3.2e-2": 2.0}
        assert wide.optim.lr / base.optim.lr == (ratio[name.rsplit("-lr", 1)[1]] if bracket
                                                 else 1.0)
        assert wide.train.amp == "off"
        net, base_net = (model_config_for(c, shape) for c in (wide, base))
        assert type(net) is type(base_net)
        assert tuple(net.channels) == tuple(2 * c for c in base_net.channels)
        assert net.hidden == 2 * base_net.hidden
