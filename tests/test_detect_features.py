"""Dynamics features on a hand-built linear DEQ where each value is known in closed form.

f(z, u) = A z + u with A = rho * Q (Q orthogonal): J_f = A everywhere, every singular value and
eigenvalue modulus is rho, and a naive step shrinks any error by exactly rho.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from deqguard.models.classifier import DEQClassifier, SolveResult
from deqguard.models.config import SolverConfig
from deqguard.models.dynamics import DynamicsConfig, dynamics_features, trajectory_features
from deqguard.models.tiny import TinyDEQConfig

D = 256


class LinearDEQ(DEQClassifier):
    """z* = (I - A)^-1 u with u = W x; a linear head."""

    def __init__(self, a: Tensor, solver: str = "naive"):
        cfg = TinyDEQConfig(num_classes=3, image_size=8,
                            solver=SolverConfig(solver=solver, max_iter=200, tol=1e-9))
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("a", a)
        self.inj = nn.Linear(64, D)
        self.head = nn.Linear(D, 3)
        with torch.no_grad():
            self.inj.weight.copy_(torch.randn(D, 64, generator=g) / 8)
            self.head.weight.copy_(torch.randn(3, D, generator=g) / 4)

    def inject(self, x: Tensor) -> Tensor:
        return self.inj(x.flatten(1))

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        return z @ self.a.T + u

    def initial_state(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)

    def decode(self, z: Tensor) -> Tensor:
        return self.head(z)


def orthogonal(rho: float, seed: int = 0) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    return rho * q


def images(n: int = 4) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_hutchinson_jacobian_rms_is_rho():
    """||A^T v||^2 = rho^2 ||v||^2 exactly; ||v||^2 / d is within 15% of 1 for d = 256 and
    the fixed probe (a 3-sigma band), so the estimate is rho within 15%."""
    model = LinearDEQ(orthogonal(0.6)).eval()
    r = model.solve(images(), features=DynamicsConfig(jacobian_vjps=2, restart_iters=0,
                                                      entropy_step=0))
    assert r.features is not None
    assert torch.allclose(r.features["jacobian_rms"], torch.full((4,), 0.6), rtol=0.15)
    # the same probe for every sample: identical estimates (A is the same everywhere)
    assert float(r.features["jacobian_rms"].std()) < 1e-6


def test_power_iteration_finds_the_spectral_radius():
    """A = diag(0.9, then values in [-0.5, 0.5]): 40 power iterations give 0.9 within 2%."""
    g = torch.Generator().manual_seed(2)
    diag = torch.rand(D, generator=g) - 0.5
    diag[7] = 0.9
    model = LinearDEQ(torch.diag(diag)).eval()
    r = model.solve(images(2), features=DynamicsConfig(power_iters=40, restart_iters=0))
    assert torch.allclose(r.features["spectral_radius"], torch.full((2,), 0.9), rtol=0.02)


def test_log_residual_at_the_exact_fixed_point_and_at_zero():
    a = orthogonal(0.5)
    model = LinearDEQ(a).eval()
    x = images(3)
    u = model.inject(x).detach()
    z_star = torch.linalg.solve(torch.eye(D) - a, u.T).T
    base = dict(residual=torch.zeros(1, 3), iterations=torch.ones(3, dtype=torch.long),
                converged=torch.ones(3, dtype=torch.bool))
    cfg = DynamicsConfig(jacobian_vjps=0, restart_iters=0, entropy_step=0)
    exact = dynamics_features(model, x, SolveResult(logits=model.decode(z_star).detach(),
                                                    z=z_star, **base), cfg)
    assert (exact["log_residual"] < -4.5).all()  # float32 round-off only
    zero = torch.zeros_like(z_star)
    at_zero = dynamics_features(model, x, SolveResult(logits=model.decode(zero).detach(),
                                                      z=zero, **base), cfg)
    # ||f(0) - 0|| / ||f(0)|| = ||u|| / ||u|| = 1
    assert torch.allclose(at_zero["log_residual"], torch.zeros(3), atol=1e-6)


def test_restart_shift_shrinks_by_rho_per_naive_step():
    """From z* + e, k naive steps leave A^k e, of norm rho^k ||e|| (A = rho Q)."""
    rho, k, kick = 0.5, 3, 0.5
    model = LinearDEQ(orthogonal(rho)).eval()
    cfg = DynamicsConfig(jacobian_vjps=0, restart_iters=k, restart_kick=kick, entropy_step=0)
    r = model.solve(images(), features=cfg)
    z = r.z
    rms = z.norm(dim=1) / math.sqrt(D)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 211)
    e_norm = kick * rms * torch.randn(1, D, generator=g).norm()
    expected = rho ** k * e_norm / z.norm(dim=1)
    assert torch.allclose(r.features["restart_shift"], expected, rtol=1e-3)
    assert (r.features["restart_flip"] == 0).all()


def test_trajectory_features_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    ent = torch.tensor([[1.0, 1.0], [0.5, 0.8], [0.2, 0.8]])  # sample 1 stopped after 2 steps
    preds = torch.tensor([[1, 1], [0, 1], [0, 1]])
    r = SolveResult(logits=logits, residual=torch.zeros(3, 2), entropy=ent, predictions=preds,
                    iterations=torch.tensor([3, 2]), converged=torch.tensor([True, False]))
    f = trajectory_features(r, DynamicsConfig(early_index=0))
    assert torch.allclose(f["mean_entropy"], torch.tensor([1.7 / 3, 0.9]))
    assert f["early_disagree"].tolist() == [1.0, 0.0]
    assert torch.allclose(f["logit_margin"], torch.tensor([2.0, 0.5]))
    assert f["converged"].tolist() == [1.0, 0.0]


def test_entropy_step_drop_lowers_entropy():
    model = LinearDEQ(orthogonal(0.5)).eval()
    r = model.solve(images(), features=DynamicsConfig(entropy_step=0.05, restart_iters=0))
    assert (r.features["entropy_step_drop"] > 0).all()
    assert "entropy_step_drop" not in model.solve(
        images(), features=DynamicsConfig(entropy_step=0)).features


def test_differentiable_features_match_and_carry_gradients():
    """The attack's surrogate computes the same numbers as serving, with a graph back to x."""
    model = LinearDEQ(orthogonal(0.5), solver="anderson").eval()
    cfg = DynamicsConfig(power_iters=2, restart_iters=4)
    x = images(3)
    plain = model.solve(x, features=cfg).features
    xg = x.clone().requires_grad_(True)
    eq = model.equilibrium(xg, grad="exact", keep_states=True)
    out = eq.output
    res = SolveResult(logits=model.decode(eq.z), residual=out.residual,
                      iterations=out.iterations, converged=out.converged, z=eq.z,
                      states=out.states)
    diff = dynamics_features(model, xg, res, cfg, differentiable=True)
    for name in cfg.names():
        a, b = diff[name].detach(), plain[name]
        if name == "log_residual":
            # At this contraction's z* both residuals are float32 rounding noise (~1e-7), and the
            # two solver paths (list history with autograd, ring buffer without) round differently.
            assert bool((a < -6).all()) and bool((b < -6).all()), (a, b)
            continue
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
    (g,) = torch.autograd.grad(diff["final_entropy"].sum() + diff["restart_entropy"].sum(), xg)
    assert g.abs().sum() > 0


def test_features_need_a_deq(tiny_model):
    from deqguard.models import build_model

    cnn = build_model("cnn", num_classes=4).eval()
    with pytest.raises(ValueError, match="DEQ"):
        dynamics_features(cnn, torch.zeros(1, 1, 28, 28), cnn.solve(torch.zeros(1, 1, 28, 28)))
