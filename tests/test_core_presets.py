"""Every preset builds, runs forward and solves on CPU; configs round-trip through JSON."""

from __future__ import annotations

import pytest
import torch

from deqguard.models import (
    PRESETS,
    InputError,
    MDEQConfig,
    build_model,
    parse_model_config,
    resolve_config,
)

CASES = [
    ("tiny", dict(in_channels=1, image_size=28), 2),
    ("tiny", dict(in_channels=3, image_size=32), 2),
    ("large", dict(), 2),
    ("cnn", dict(in_channels=1, image_size=28), 2),
    ("cnn-wk", dict(in_channels=1, image_size=28), 2),
    ("deq-wk", dict(in_channels=1, image_size=28), 2),
    ("deq-wk", dict(in_channels=3, image_size=32, head="pool", expansion=2), 2),
    ("resnet18", dict(), 2),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_large_matches_paper_parameter_count():
    # paper.md 2.1: MDEQ-Large is about 11.10M parameters.
    count = n_params(build_model("large"))
    assert abs(count - 11.1e6) / 11.1e6 < 0.03, count


def test_large_is_the_paper_architecture():
    cfg = resolve_config("large")
    assert isinstance(cfg, MDEQConfig)
    assert cfg.channels == (32, 64, 128, 256) and cfg.expansion == 5 and cfg.num_groups == 8
    assert cfg.head_channels == (14, 28, 56, 112) and cfg.final_channels == 1680
    assert cfg.dropout == 0.22 and cfg.weight_norm
    assert cfg.solver.solver == "broyden" and cfg.solver.max_iter == 8


@pytest.mark.parametrize("preset,shape,batch", CASES,
                         ids=[f"{p}-{s.get('image_size', 32)}" for p, s, _ in CASES])
def test_preset_forward_and_solve(preset, shape, batch):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=5, **shape).eval()
    cfg = model.config
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        logits = model(x)
        result = model.solve(x, max_iter=3)
    assert logits.shape == (batch, 5) and bool(torch.isfinite(logits).all())
    assert result.logits.shape == (batch, 5)
    assert result.entropy.shape == result.residual.shape
    assert result.entropy.shape[1] == batch
    assert result.iterations.shape == result.converged.shape == (batch,)
    if model.is_deq:
        assert result.entropy.shape[0] <= 3
        torch.testing.assert_close(result.logits, model(x, max_iter=3), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(result.logits, logits)


def test_anchor_cnn_is_the_papers_network():
    # Croce, Andriushchenko, Hein 2019, Table 1: conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10
    model = build_model("cnn-wk", num_classes=10, in_channels=1, image_size=28)
    assert n_params(model) == 166_406
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    shapes = [tuple(m.weight.shape) for m in layers]
    assert shapes == [(16, 1, 4, 4), (32, 16, 4, 4), (100, 1568), (10, 100)]
    assert [m.stride for m in layers[:2]] == [(2, 2), (2, 2)]
    assert [m.padding for m in layers[:2]] == [(1, 1), (1, 1)]
    acts = [type(m) for m in model.net.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(acts) == 3


def test_anchor_deq_keeps_the_anchors_stem_and_head():
    anchor = build_model("cnn-wk", num_classes=10, in_channels=1, image_size=28)
    deq = build_model("deq-wk", num_classes=10, in_channels=1, image_size=28)
    assert deq.is_deq
    stem = [tuple(m.weight.shape) for m in deq.stem if isinstance(m, torch.nn.Conv2d)]
    head = [tuple(m.weight.shape) for m in deq.head if isinstance(m, torch.nn.Linear)]
    assert stem == [(16, 1, 4, 4), (32, 16, 4, 4)] and head == [(100, 1568), (10, 100)]
    u = deq.inject(torch.rand(3, 1, 28, 28))
    assert u.shape == (3, 32, 7, 7)  # the 7x7x32 state
    assert n_params(deq) - n_params(anchor) == n_params(deq.cell)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("deq-wk", image_size=30)


def test_training_mode_forward_backward_on_large():
    torch.manual_seed(0)
    model = build_model("large").train()
    x = torch.rand(2, 3, 32, 32)
    model(x, max_iter=2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = PRESETS[name]
    assert parse_model_config(cfg.model_dump_json()) == cfg
    assert parse_model_config(cfg.model_dump(mode="json")) == cfg


def test_overrides_and_unknown_preset():
    model = build_model("tiny", num_classes=7, in_channels=3, image_size=32, width=8)
    assert (model.config.num_classes, model.config.in_channels, model.config.width) == (7, 3, 8)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model("huge")
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("large", image_size=28)


def test_check_input_names_the_problem():
    model = build_model("tiny", num_classes=3)
    with pytest.raises(InputError, match=r"shape \[N, 1, 28, 28\]"):
        model.check_input(torch.rand(2, 3, 28, 28))
    with pytest.raises(InputError, match="floating-point"):
        model.check_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    bad = torch.rand(2, 1, 28, 28)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model.check_input(bad)
    model.check_input(torch.rand(2, 1, 28, 28))
