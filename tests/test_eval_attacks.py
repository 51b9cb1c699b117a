"""Evaluation attacks: exactness on a linear model, the per-sample combiner, a tiny trained DEQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import env_seed
from torch import nn

from deqguard.evaluation.attacks import (
    AttackSpec,
    detector_loss,
    intermediate_logits,
    parse_grid,
    path_logits,
    run_attack,
    worst_case,
)


class Linear(nn.Module):
    is_deq = False

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def analytic_min_margin(w, b, x, y, eps):
    """min over the eps-box intersected with [0,1]^d of (w_y - w_j) x + (b_y - b_j), per j.

    The objective is separable and linear: each coordinate goes to whichever end of its
    interval [max(x-eps, 0), min(x+eps, 1)] lowers it.
    """
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    out = []
    for j in range(w.shape[0]):
        d = w[y] - w[j]  # [B, D]
        worst = torch.where(d > 0, lo, hi)
        m = (d * worst).sum(1) + b[y] - b[j]
        out.append(torch.where(y == j, torch.full_like(m, float("inf")), m))
    return torch.stack(out, 1).min(1).values


def _linear_problem(classes, seed=0, n=200, d=20):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, d, generator=g)
    b = torch.randn(classes, generator=g) * 0.5
    x = torch.rand(n, d, generator=g)
    y = (x @ w.T + b).argmax(1)  # clean-correct by construction
    return Linear(w, b), w, b, x, y


def test_pgd_matches_analytic_worst_case_binary():
    model, w, b, x, y = _linear_problem(2)
    eps = 0.05
    spec = AttackSpec(name="pgd", kind="pgd", eps=eps, steps=20, step_size=0.02,
                      gradient="direct")
    predict = lambda xa: model(xa).argmax(1)  # noqa: E731
    x_adv, ok = run_attack(model, spec, x, y, predict, generator=torch.Generator().manual_seed(1))
    robust = analytic_min_margin(w, b, x, y, eps) > 0
    assert 0.1 < robust.float().mean() < 0.9  # the test is not trivial either way
    assert torch.equal(ok, robust)
    # and the attack reached the analytic minimiser (the margin it achieved is the minimum)
    logits = model(x_adv)
    achieved = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, (1 - y)[:, None])[:, 0]
    torch.testing.assert_close(achieved, analytic_min_margin(w, b, x, y, eps), atol=1e-4,
                               rtol=1e-4)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_multiclass_never_beats_and_nearly_reaches_the_analytic_bound():
    model, w, b, x, y = _linear_problem(5, seed=3)
    eps = 0.04
    spec = AttackSpec(name="pgd", kind="pgd", eps=eps, steps=40, step_size=0.005,
                      gradient="direct", restarts=3)
    _, ok = run_attack(model, spec, x, y, lambda xa: model(xa).argmax(1),
                       generator=torch.Generator().manual_seed(2))
    robust = analytic_min_margin(w, b, x, y, eps) > 0
    assert not (robust & ~ok).any()  # PGD cannot fool a provably robust sample
    assert ok.float().mean() - robust.float().mean() <= 0.05


def test_worst_case_is_per_sample_not_min_of_accuracies():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, False, True, True])
    wc = worst_case({"a": a, "b": b})
    assert wc.float().mean() == 0.0
    assert min(a.float().mean(), b.float().mean()) == 0.5
    c = torch.tensor([True, False, True, True])
    assert worst_case({"a": c, "b": torch.tensor([True, True, False, True])}).tolist() == [
        True, False, False, True]
    with pytest.raises(ValueError):
        worst_case({})


def test_parse_grid():
    assert parse_grid("1:5, 4:9") == [(1, 5), (4, 9)]
    assert parse_grid("") == []


@pytest.fixture(scope="module")
def tiny(tiny_model, pattern_data):
    x, y = (torch.from_numpy(a[:64]) for a in pattern_data)
    return tiny_model, x, y


def test_robust_accuracy_below_clean_and_decreasing_in_eps(tiny):
    """Radii far enough apart that the trend holds for any fixture seed, not for one.

    Across 20 fixture seeds (5-step PGD, 64 samples): eps 0.02 leaves 62-64 correct, 0.15 at
    most 53, 0.4 at most 21, with at least 7 samples between neighbours. Radii closer together
    are not ordered reliably: a well-trained fixture can be fully robust at 0.1, and above ~0.2
    the phantom-gradient attack plateaus on some seeds (gradient masking, not robustness).
    """
    model, x, y = tiny
    predict = lambda xa: model(xa).argmax(1)  # noqa: E731
    with torch.no_grad():
        clean = (predict(x) == y).float().mean().item()
    accs = []
    for eps in (0.02, 0.15, 0.4):
        spec = AttackSpec(name="pgd", kind="pgd", eps=eps, steps=5, step_size=2.5 * eps / 5,
                          gradient="phantom")
        _, ok = run_attack(model, spec, x, y, predict,
                           generator=torch.Generator().manual_seed(env_seed()))
        accs.append(ok.float().mean().item())
    assert accs[1] < clean, accs
    assert accs[0] >= accs[1] >= accs[2] and accs[2] < accs[0], accs


@pytest.mark.parametrize("path", ["phantom", "implicit", "exact"])
def test_every_gradient_path_gives_a_nonzero_finite_input_gradient(tiny, path):
    model, x, y = tiny
    xr = x[:8].clone().requires_grad_(True)
    F.cross_entropy(path_logits(model, xr, path), y[:8]).backward()
    g = xr.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_exact_and_phantom_gradients_differ(tiny):
    """Compared at samples whose solve converged: only there do the paths estimate one gradient.

    At an unconverged iterate the implicit and phantom paths assume a fixed point that is not
    there; on some fixture seeds the cosine with the exact path was then negative (-0.26).
    Over converged samples it stayed in 0.39-0.98 for 20 seeds.
    """
    model, x, y = tiny
    with torch.no_grad():
        converged = model.solve(x, trajectory=False).converged.nonzero().flatten()
    assert len(converged) >= 8, "the fixture's solver converges on too few samples"
    xs, ys = x[converged[:8]], y[converged[:8]]
    grads = []
    for path in ("phantom", "exact"):
        xr = xs.clone().requires_grad_(True)
        F.cross_entropy(path_logits(model, xr, path), ys).backward()
        grads.append(xr.grad.flatten())
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos < 0.9999  # two different paths, not one path twice
    assert cos > 0  # and both point uphill on the same loss


@pytest.mark.parametrize("path", ["exact", "implicit"])
def test_autoattack_module_attacks_through_the_requested_gradient(tiny, path):
    """AutoAttack sees a plain logits module; its gradient must be the chosen path's.

    The fixture trains with the phantom path, as the shipped presets do: a module that fell back
    to the checkpoint's default would be attacked through that weaker approximation.
    """
    from deqguard.evaluation.robustness import _Logits

    model, x, y = tiny
    assert model.config.grad.mode == "phantom"

    def input_grad(fn) -> torch.Tensor:
        xr = x[:8].clone().requires_grad_(True)
        F.cross_entropy(fn(xr), y[:8]).backward()
        return xr.grad

    got = input_grad(_Logits(model, path))
    assert torch.allclose(got, input_grad(lambda t: path_logits(model, t, path)), atol=1e-6)
    assert not torch.allclose(got, input_grad(model), atol=1e-6)


def test_intermediate_and_detector_losses_have_gradients(tiny):
    model, x, y = tiny
    xr = x[:8].clone().requires_grad_(True)
    logits = intermediate_logits(model, xr, state=2, unroll=3, tau=0.5)
    F.cross_entropy(logits, y[:8]).backward()
    assert xr.grad.abs().sum() > 0
    xr.grad = None
    detector_loss(model, xr, y[:8], lam=0.5).sum().backward()
    assert np.isfinite(xr.grad.abs().sum().item()) and xr.grad.abs().sum() > 0
