"""The Sec 3.2 defense: stays in its radius and [0,1], lowers entropy, and has a usable gradient."""

from __future__ import annotations

import pytest
import torch

from deqguard.models.defense import (
    FULL_GRADIENT,
    DefendedClassifier,
    EntropyReductionConfig,
    bpda_logits,
    default_eps,
    entropy_reduction_solve,
    entropy_reduction_trace,
)


@pytest.fixture(scope="module")
def model_and_data(tiny_model, pattern_data):
    x, y = (torch.from_numpy(a[:48]) for a in pattern_data)
    return tiny_model, x, y


def test_inputs_stay_in_radius_and_range(model_and_data):
    model, x, _ = model_and_data
    cfg = EntropyReductionConfig(eps=0.05, input_steps=5)
    trace = entropy_reduction_trace(model, x, cfg)
    for xp in (trace.x_final, trace.x_readout):
        assert (xp - x).abs().max() <= 0.05 + 1e-6
        assert xp.min() >= 0 and xp.max() <= 1
    assert (trace.x_final - x).abs().max() > 0.01  # the input did move


def test_defense_lowers_entropy_on_average(model_and_data):
    model, x, _ = model_and_data
    cfg = EntropyReductionConfig(eps=0.1, input_steps=10)
    plain = model.solve(x, max_iter=cfg.rounds * cfg.solver_steps_per_round)
    defended = entropy_reduction_solve(model, x, cfg)
    assert defended.final_entropy.mean() < plain.final_entropy.detach().mean()
    # same budget of solver steps, with a per-step trajectory
    assert defended.entropy.shape[0] == plain.entropy.shape[0] == 8


def test_zero_radius_is_the_plain_solve(model_and_data):
    """With eps = 0 the rounds only restart a memoryless solver: the plain solve's answer."""
    model, x, _ = model_and_data
    cfg = EntropyReductionConfig(eps=0.0, rounds=3, solver_steps_per_round=2)
    plain = model.solve(x, solver="naive", max_iter=6)
    defended = entropy_reduction_solve(model, x, cfg, solver="naive")
    torch.testing.assert_close(defended.logits, plain.logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(defended.entropy, plain.entropy, atol=1e-5, rtol=1e-5)


def test_bpda_value_is_the_defended_prediction_and_gradient_nonzero(model_and_data):
    model, x, _ = model_and_data
    cfg = EntropyReductionConfig(input_steps=3, rounds=2)
    xr = x[:8].clone().requires_grad_(True)
    logits = bpda_logits(model, xr, cfg)
    ref = entropy_reduction_solve(model, x[:8], cfg).logits
    torch.testing.assert_close(logits.detach(), ref, atol=1e-5, rtol=1e-5)
    logits.logsumexp(1).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    for path in ("phantom", "implicit"):
        xp = x[:8].clone().requires_grad_(True)
        out = bpda_logits(model, xp, cfg, grad=path)
        torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
        out.logsumexp(1).sum().backward()
        assert xp.grad.abs().sum() > 0, path
    wrapped = DefendedClassifier(model, cfg)
    torch.testing.assert_close(wrapped(x[:8]).detach(), ref, atol=1e-5, rtol=1e-5)


def test_runs_under_inference_mode_and_defaults(model_and_data):
    model, x, _ = model_and_data
    with torch.inference_mode():
        res = entropy_reduction_solve(model, x[:4], EntropyReductionConfig(input_steps=1))
    assert res.logits.shape == (4, 4)
    assert default_eps(1, 28) == 0.1 and default_eps(3, 32) == pytest.approx(8 / 255)
    assert EntropyReductionConfig().resolved(model).step_size == pytest.approx(0.025)


def test_defended_trajectory_does_not_depend_on_batch_mates(model_and_data):
    """Samples stop at different steps within a round; each keeps its own rows back to back."""
    model, x, _ = model_and_data
    cfg = EntropyReductionConfig(rounds=3, solver_steps_per_round=4, input_steps=2)
    xs = x[:6]
    batch = entropy_reduction_solve(model, xs, cfg, tol=0.15)
    assert batch.iterations.unique().numel() > 1  # some samples did stop early
    for i in range(len(xs)):
        alone = entropy_reduction_solve(model, xs[i:i + 1], cfg, tol=0.15)
        n = int(alone.iterations[0])
        assert int(batch.iterations[i]) == n
        torch.testing.assert_close(batch.entropy[:n, i], alone.entropy[:n, 0], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(batch.residual[:n, i], alone.residual[:n, 0], atol=1e-4,
                                   rtol=1e-4)
        assert torch.all(batch.entropy[n:, i] == batch.entropy[n - 1, i])


def _grad(model, x, cfg, path, w, **kw):
    xr = x.clone().requires_grad_(True)
    (bpda_logits(model, xr, cfg, grad=path, **kw) * w).sum().backward()
    return xr.grad


def test_full_gradient_drops_updates_that_pin_pixels_to_the_image_range(model_and_data):
    """With a step of 2 and a radius of 1, one input step sends every pixel of x' to 0 or 1
    strictly through the clip: x' no longer moves with x, so the exact gradient reaches x only
    through the first round's injection and the state it hands on. BPDA would pass a second,
    identity path through the purified input; grad="full" must not."""
    model, x, _ = model_and_data
    xs = 0.1 + 0.8 * x[:6]  # in [0.1, 0.9]: x +- 1 always lies strictly outside [0, 1]
    cfg = EntropyReductionConfig(eps=1.0, step_size=2.0, rounds=2, solver_steps_per_round=2,
                                 input_steps=1)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    kw = {"solver": "naive", "tol": 0.0}
    full = _grad(model, xs, cfg, FULL_GRADIENT, w, **kw)
    bpda = _grad(model, xs, cfg, "exact", w, **kw)

    x_pinned = entropy_reduction_trace(model, xs, cfg, trajectory=False, **kw).x_final
    assert torch.all((x_pinned == 0) | (x_pinned == 1))
    xr = xs.clone().requires_grad_(True)  # the same two rounds, x' held constant
    z = model.equilibrium(xr, max_iter=2, grad="exact", **kw).z
    z = model.equilibrium(x_pinned, max_iter=2, grad="exact", z0=z, **kw).z
    (model.decode(z) * w).sum().backward()
    torch.testing.assert_close(full, xr.grad, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(bpda, xr.grad, atol=1e-6, rtol=1e-4)


def test_full_gradient_equals_bpda_where_no_update_meets_the_image_range(model_and_data):
    """Away from 0 and 1 every update's exact derivative is the identity, BPDA's assumption."""
    model, x, _ = model_and_data
    xs = 0.3 + 0.4 * x[:6]  # in [0.3, 0.7]: x +- eps never leaves [0, 1]
    cfg = EntropyReductionConfig(eps=0.1, rounds=3, input_steps=4)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    full, bpda = (_grad(model, xs, cfg, p, w) for p in (FULL_GRADIENT, "exact"))
    assert full.abs().sum() > 0
    torch.testing.assert_close(full, bpda, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("path", ["exact", FULL_GRADIENT])
def test_attack_through_the_defense_stays_in_the_ball_and_raises_the_loss(model_and_data, path):
    import torch.nn.functional as F

    from deqguard.evaluation.attacks import AttackSpec, run_attack

    model, x, y = model_and_data
    xs, ys = x[:16], y[:16]
    cfg = EntropyReductionConfig(rounds=2, input_steps=3).resolved(model)
    spec = AttackSpec(name="t", kind="bpda", eps=0.1, steps=4, step_size=0.04, gradient=path)

    def predict(xb):
        return entropy_reduction_solve(model, xb, cfg).logits.argmax(1)

    def loss(xb):
        return F.cross_entropy(entropy_reduction_solve(model, xb, cfg).logits, ys)

    x_adv, ok = run_attack(model, spec, xs, ys, predict, defense=cfg,
                           generator=torch.Generator().manual_seed(0))
    assert (x_adv - xs).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert loss(x_adv) > loss(xs)  # the gradient through the defense points uphill
    torch.testing.assert_close(ok, predict(x_adv) == ys)
