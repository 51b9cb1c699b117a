"""Implicit and phantom gradients against exact backprop through the solver iterations.

Toy DEQ: z = tanh(W z + U x) with ||W||_2 = L = 0.5, so ||J|| <= L everywhere and every
gradient path is well defined. Tolerances:
- implicit vs exact: both converge to the implicit-function-theorem gradient (forward and
  adjoint solved to 1e-12 in float64), so they must agree to rel err < 1e-8.
- phantom (f(z*) then K damped steps, tau): with A = (1 - tau) I + tau J, its state-level
  gradient is the IFT one minus A^K J (I - J)^-1 (...), i.e. a relative error up to
  L ((1 - tau) + tau L)^K = 0.5 * 0.75^5 = 0.119 for the default K = 5, tau = 0.5. The test uses
  that bound, and checks that the error vanishes as K grows (K = 40: 0.5 * 0.75^40 = 5e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqguard.models import (
    DEQClassifier,
    GradConfig,
    SolverConfig,
    TinyDEQConfig,
    build_model,
)

L = 0.5


class ToyDEQ(DEQClassifier):
    """A small contractive DEQ through the real DEQClassifier machinery."""

    def __init__(self, dim: int = 6, num_classes: int = 3, solver: str = "anderson"):
        cfg = TinyDEQConfig(
            num_classes=num_classes, image_size=8,
            solver=SolverConfig(solver=solver, max_iter=300, tol=1e-12),
            grad=GradConfig(backward_tol=1e-12, backward_max_iter=300))
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        self.inj = nn.Linear(64, dim)
        w = torch.randn(dim, dim, generator=g)
        self.w = nn.Parameter(w / torch.linalg.matrix_norm(w, 2) * L)
        self.head = nn.Linear(dim, num_classes)

    def inject(self, x):
        return self.inj(x.flatten(1))

    def layer(self, z, u):
        return torch.tanh(z @ self.w.T + u)

    def initial_state(self, u):
        return torch.zeros_like(u)

    def decode(self, z):
        return self.head(z)


def loss_gradient(model, x, y, **kwargs) -> torch.Tensor:
    """Gradient of the CE loss w.r.t. the input and every parameter, as one vector."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    F.cross_entropy(model(x, **kwargs), y).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return torch.cat([g.flatten() for g in grads])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyDEQ().double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    exact = loss_gradient(model, x, y, grad="exact", solver="naive")
    return model, x, y, exact


@pytest.mark.parametrize("solver", ["naive", "anderson", "broyden"])
def test_implicit_matches_exact_backprop(toy, solver):
    model, x, y, exact = toy
    implicit = loss_gradient(model, x, y, grad="implicit", solver=solver)
    assert rel_err(implicit, exact) < 1e-8


def test_phantom_is_within_its_truncation_bound_and_converges(toy):
    model, x, y, exact = toy
    cfg = model.config.grad
    bound = L * ((1 - cfg.phantom_tau) + cfg.phantom_tau * L) ** cfg.phantom_steps
    phantom = loss_gradient(model, x, y, grad="phantom")
    err = rel_err(phantom, exact)
    assert 0 < err < bound
    long = loss_gradient(model, x, y, grad=cfg.model_copy(update={"phantom_steps": 40}))
    assert rel_err(long, exact) < 1e-5 < err


def test_gradcheck_implicit_and_exact_paths():
    torch.manual_seed(1)
    model = ToyDEQ(dim=4).double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    # Full Jacobian check for the implicit path; exact only needs a random projection (fast mode).
    assert torch.autograd.gradcheck(lambda inp: model(inp, grad="implicit"), (x,))
    assert torch.autograd.gradcheck(lambda inp: model(inp, grad="exact"), (x,), fast_mode=True)


def test_tiny_deq_implicit_matches_exact_in_float64():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, width=8, head_width=16).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([0, 3])
    budget = dict(max_iter=300, tol=1e-10)
    exact = loss_gradient(model, x, y, grad="exact", solver="naive", **budget)
    implicit_cfg = GradConfig(mode="implicit", backward_tol=1e-10, backward_max_iter=200)
    implicit = loss_gradient(model, x, y, grad=implicit_cfg, **budget)
    assert rel_err(implicit, exact) < 1e-6


def test_every_path_reaches_the_weight_normed_convolutions():
    # parametrize.cached() once cached these weights under the solver's no_grad: the phantom and
    # implicit paths then gave the convolutions inside f no gradient at all.
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, width=8, head_width=16)
    x = torch.rand(2, 1, 28, 28)
    for mode in ("phantom", "implicit", "exact"):
        model.zero_grad()
        model(x, grad=mode).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), (mode, name)


def test_readout_state_value_is_z_star_and_unrolled_is_not():
    torch.manual_seed(0)
    model = ToyDEQ().double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    eq = model.equilibrium(x, grad="phantom", readout="state")
    assert torch.equal(eq.z.detach(), eq.z_star)
    assert eq.z.requires_grad
    unrolled = model.equilibrium(x, grad="phantom", readout="unrolled")
    # At a 1e-12 fixed point the unroll barely moves the state, but it is its own output.
    torch.testing.assert_close(unrolled.z.detach(), eq.z_star, rtol=1e-9, atol=1e-9)
    assert unrolled.z.grad_fn is not None


def test_no_gradient_without_grad_mode():
    model = ToyDEQ()
    with torch.no_grad():
        for mode in ("phantom", "implicit", "exact"):
            assert not model(torch.rand(2, 1, 8, 8), grad=mode).requires_grad
