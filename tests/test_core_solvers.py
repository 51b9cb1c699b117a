"""Fixed-point solvers against problems whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

from deqguard.models import build_model, get_solver, register_solver, solver_names
from deqguard.models import solvers as registry
from deqguard.models.solvers import SolverOutput, naive_solve

SOLVERS = ["naive", "anderson", "broyden"]


def affine_problem(dim: int = 24, batch: int = 5, rho: float = 0.9, seed: int = 0,
                   spectrum: tuple[float, float] | None = None):
    """f(z) = A z + b with ||A||_2 = rho < 1; the truth solves (I - A) z* = b.

    With `spectrum` A is symmetric with eigenvalues spread over that interval instead.
    """
    g = torch.Generator().manual_seed(seed)
    if spectrum is None:
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        a = a / torch.linalg.matrix_norm(a, 2) * rho
    else:
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        eig = torch.linspace(*spectrum, dim, dtype=torch.float64)
        a = q @ torch.diag(eig) @ q.T
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    truth = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T

    def f(z: torch.Tensor) -> torch.Tensor:
        return z @ a.T + b

    return f, truth, float(torch.linalg.matrix_norm(a, 2))


def rel_err(z: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (z - truth).norm(dim=1) / truth.norm(dim=1)


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_finds_known_fixed_point(name):
    f, truth, rho = affine_problem()
    tol = 1e-8
    out = get_solver(name)(f, torch.zeros_like(truth), max_iter=500, tol=tol, stop_mode="rel")
    assert isinstance(out, SolverOutput)
    assert bool(out.converged.all())
    # ||z_{t-1} - z*|| <= r ||f(z)|| / (1 - rho), and the final state is f(z_{t-1}).
    assert float(rel_err(out.z, truth).max()) < 10 * tol / (1 - rho)
    assert out.residual.shape == (int(out.iterations.max()), truth.shape[0])


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_abs_stop_mode(name):
    f, truth, rho = affine_problem(seed=3)
    out = get_solver(name)(f, torch.zeros_like(truth), max_iter=500, tol=1e-9, stop_mode="abs")
    assert bool(out.converged.all())
    assert float((out.z - truth).norm(dim=1).max()) < 10 * 1e-9 / (1 - rho)


def test_damped_naive_finds_fixed_point_and_helps_oscillating_maps():
    # Eigenvalues down to -0.95: plain iteration oscillates slowly, damping 0.5 maps them to
    # (1-d) + d*lambda in [0.025, 0.55], which contracts much faster.
    f, truth, _ = affine_problem(spectrum=(-0.95, 0.1), seed=1)
    z0 = torch.zeros_like(truth)
    plain = naive_solve(f, z0, max_iter=1000, tol=1e-8)
    damped = get_solver("naive")(f, z0, max_iter=1000, tol=1e-8, damping=0.5)
    assert bool(damped.converged.all()) and bool(plain.converged.all())
    assert float(rel_err(damped.z, truth).max()) < 1e-6
    assert int(damped.iterations.max()) < int(plain.iterations.min()) / 2


def test_accelerated_solvers_take_fewer_iterations_on_affine_problem():
    f, truth, _ = affine_problem(spectrum=(0.0, 0.95), seed=2)  # naive needs ~270 steps
    z0 = torch.zeros_like(truth)
    its = {name: get_solver(name)(f, z0, max_iter=1000, tol=1e-6).iterations.float().mean()
           for name in SOLVERS}
    assert its["anderson"] < its["naive"]
    assert its["broyden"] < its["naive"]


def test_accelerated_solvers_take_fewer_iterations_on_tiny_deq_at_init():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, width=16, head_width=32).eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        its = {name: model.solve(x, solver=name, max_iter=100, tol=1e-3, trajectory=False)
               for name in SOLVERS}
    assert all(bool(r.converged.all()) for r in its.values())
    mean = {k: r.iterations.float().mean() for k, r in its.items()}
    assert mean["anderson"] < mean["naive"]
    assert mean["broyden"] < mean["naive"]


def test_keep_states_is_opt_in():
    f, truth, _ = affine_problem()
    z0 = torch.zeros_like(truth)
    assert get_solver("anderson")(f, z0, max_iter=20, tol=1e-6).states is None
    out = get_solver("anderson")(f, z0, max_iter=20, tol=1e-6, keep_states=True)
    assert len(out.states) == out.residual.shape[0]
    assert torch.equal(out.states[-1], out.z)


def test_max_iter_caps_steps_and_reports_not_converged():
    f, truth, _ = affine_problem(rho=0.99)
    out = get_solver("naive")(f, torch.zeros_like(truth), max_iter=3, tol=1e-10)
    assert out.residual.shape[0] == 3
    assert out.iterations.tolist() == [3] * truth.shape[0]
    assert not bool(out.converged.any())


def test_unknown_solver_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown solver 'newton'.*anderson.*broyden.*naive"):
        get_solver("newton")


def test_register_solver_is_usable_by_models(monkeypatch):
    # A copy of the registry, so that the test leaves no solver behind for other tests.
    monkeypatch.setattr(registry, "_SOLVERS", dict(registry._SOLVERS))
    calls = []

    def halved(f, z0, **kw):
        calls.append(kw["max_iter"])
        return naive_solve(f, z0, damping=0.5, **{k: v for k, v in kw.items() if k != "damping"})

    register_solver("halved", halved)
    assert "halved" in solver_names()
    assert get_solver("halved") is halved
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, width=8, head_width=8).eval()
    with torch.no_grad():
        r = model.solve(torch.rand(2, 1, 28, 28), solver="halved", max_iter=7, tol=1e-3)
    assert calls == [7]
    assert r.logits.shape == (2, 3)


@pytest.mark.parametrize("name,options", [("naive", {}), ("anderson", {"anderson_m": 3}),
                                          ("broyden", {"broyden_memory": 3})])
def test_grad_and_no_grad_solves_agree_when_history_wraps(name, options):
    # Without autograd Broyden keeps its factors in a ring buffer, with autograd it concatenates;
    # a memory of 3 makes both drop old terms many times over.
    # (Truncated "good Broyden" is known to diverge on harder problems, e.g. eigenvalues up to
    # 0.9 with memory <= 8; this one converges, so the two paths can be compared.)
    f, truth, _ = affine_problem(spectrum=(0.0, 0.6), seed=4)
    z0 = torch.zeros_like(truth)
    with torch.no_grad():
        plain = get_solver(name)(f, z0, max_iter=60, tol=1e-9, **options)
    graph = get_solver(name)(f, z0.requires_grad_(), max_iter=60, tol=1e-9, **options)
    assert graph.z.requires_grad
    assert torch.equal(plain.iterations, graph.iterations)
    assert bool(plain.converged.all())
    torch.testing.assert_close(plain.z, graph.z.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(plain.z, truth, rtol=1e-7, atol=1e-7)
    assert int(plain.iterations.min()) > 10  # the history did wrap


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_anderson_ring_history_repeats_the_list_history_iterate_by_iterate(beta):
    # The in-place ring buffer with its incremental Gram matrix (no autograd) against the stacked
    # list history (autograd on): the same mixing problem, so the same iterates up to rounding.
    f, truth, _ = affine_problem(spectrum=(0.0, 0.9), seed=5)
    z0 = torch.zeros_like(truth)
    opts = {"max_iter": 40, "tol": 1e-10, "anderson_m": 4, "beta": beta, "keep_states": True}
    with torch.no_grad():
        ring = get_solver("anderson")(f, z0, **opts)
    listed = get_solver("anderson")(f, z0.clone().requires_grad_(), **opts)
    assert torch.equal(ring.iterations, listed.iterations)
    assert len(ring.states) == len(listed.states) > 8
    for a, b in zip(ring.states, listed.states, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-9)
    assert float(rel_err(ring.z, truth).max()) < 1e-3  # and they head for the true fixed point


def test_anderson_ring_history_gives_the_same_fixed_point_on_a_deq():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, width=8, head_width=8).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        ring = model.solve(x, solver="anderson", max_iter=60, tol=1e-5)
    listed = model.solve(x, solver="anderson", max_iter=60, tol=1e-5, grad="exact")
    assert bool(ring.converged.all()) and bool(listed.converged.all())
    torch.testing.assert_close(ring.logits, listed.logits.detach(), rtol=1e-3, atol=1e-3)
