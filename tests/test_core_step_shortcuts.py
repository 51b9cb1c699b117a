"""The per-step shortcuts of the solve path give the numbers of the plain computations.

At batch 1 (a lone served image runs as a pair) a solve's time is the count of tensor ops, so the
solvers skip masks that select everything, count stopped samples on the host, keep Anderson's
views and mixing system across steps, and the entropy-step feature binds the layer once. Each
shortcut must change no number: these tests hold each one to the plain form, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from deqguard.models import build_model, load_checkpoint
from deqguard.models.dynamics import _entropy_step_drop
from deqguard.models.entropy import prediction_entropy
from deqguard.models.solvers import STOP_REASONS, get_solver
from deqguard.models.solvers.anderson import _mixing_weights, _RingHistory

SOLVERS = ["naive", "anderson", "broyden"]
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "default.safetensors"


def _problem(batch: int, dim: int = 12, seed: int = 0):
    """f(z) = rho_i 0.8 cos(z + phase) + b_i, float64 and elementwise (no kernel mixes rows, so
    a sample's numbers cannot depend on its mates), each sample with its own contraction rho_i
    and offset, so that samples stop at different steps. Returns f and f on chosen rows."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(dim, generator=g, dtype=torch.float64) * 3
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    rho = torch.linspace(0.2, 1.2, batch, dtype=torch.float64).view(-1, 1)

    def f_rows(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rho[rows] * 0.8 * torch.cos(z + phase) + b[rows]

    def f(z: torch.Tensor) -> torch.Tensor:
        return f_rows(z, torch.arange(z.shape[0]))

    return f, f_rows


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "f-rows"])
@pytest.mark.parametrize("name", SOLVERS)
def test_every_stop_reason_gives_the_answer_the_sample_gets_alone(name, rows, hooks):
    """A batch where samples stop at different steps for every reason (tol, settled, deadline,
    max_iter) takes the masked forms, a lone sample the all-true shortcuts: each sample's
    iterate, residual row, count and reason agree, and a sample stopped on tol ends on f of
    the state its last step started from."""
    b = 6
    f, f_rows = _problem(b)
    settle_at = {1: 2} if hooks else {}  # sample 1 is settled after step 2
    deadline = torch.full((b,), float("inf"), dtype=torch.float64)
    if hooks:
        deadline[3] = time.time() - 1  # sample 3 stops after its first step

    def stop_when(t, z_t, active):
        return torch.tensor([settle_at.get(i) == t for i in range(z_t.shape[0])])

    opts = {"max_iter": 8, "tol": 1e-4}
    hook_opts = {"stop_when": stop_when, "deadline": deadline} if hooks else {}
    z0 = torch.zeros(b, 12, dtype=torch.float64)
    out = get_solver(name)(f, z0, f_rows=f_rows if rows else None, keep_states=True,
                           **hook_opts, **opts)
    reasons = {STOP_REASONS[int(s)] for s in out.stopped}
    assert reasons == ({"tol", "settled", "deadline", "max_iter"} if hooks
                       else {"tol", "max_iter"})
    assert len(set(out.iterations.tolist())) > (2 if hooks else 1)  # stopped at different steps
    for i in range(b):
        _, rows_fn = _problem(b)
        row = torch.tensor([i])

        def f_alone(z, row=row, rows_fn=rows_fn):
            return rows_fn(z, row)

        def hook(t, z_t, active, i=i):
            return torch.tensor([settle_at.get(i) == t])

        alone_opts = {"stop_when": hook, "deadline": deadline[i:i + 1]} if hooks else {}
        alone = get_solver(name)(f_alone, z0[:1], **alone_opts, **opts)
        steps = int(alone.iterations)
        assert int(out.iterations[i]) == steps
        assert int(out.stopped[i]) == int(alone.stopped[0])
        assert bool(out.converged[i]) == bool(alone.converged[0])
        assert torch.equal(out.z[i], alone.z[0])
        assert torch.equal(out.residual[:steps, i], alone.residual[:, 0])
        # a stopped sample's residual row repeats its last value
        assert bool((out.residual[steps:, i] == alone.residual[-1, 0]).all())
        if STOP_REASONS[int(out.stopped[i])] == "tol":
            start = out.states[steps - 2] if steps > 1 else z0
            assert torch.equal(out.z[i], f(start)[i])


def test_tol_is_the_reason_exactly_when_a_sample_ends_converged():
    f, _ = _problem(5)
    out = get_solver("anderson")(f, torch.zeros(5, 12, dtype=torch.float64), max_iter=6,
                                 tol=1e-4)
    tol = STOP_REASONS.index("tol")
    assert out.converged.any() and not out.converged.all()
    assert torch.equal(out.stopped == tol, out.converged)


@pytest.mark.parametrize("m", [2, 5])
def test_anderson_ring_mixing_weights_are_the_plain_ones_bit_for_bit(m):
    """The ring history's kept system against `_mixing_weights` on its Gram matrix, at every
    step: before the history fills, when it wraps, and with float32 states."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.zeros(3, 4, 5)
    hist = _RingHistory(z0, m)
    for _ in range(3 * m + 1):
        z = torch.randn(3, 4, 5, generator=g)
        hist.push(z, 0.5 * z + torch.randn(3, 4, 5, generator=g))
        if hist.n < 2:
            continue
        fast = hist.mixing_weights(1e-4)
        assert torch.equal(fast, _mixing_weights(hist.gram(), 1e-4, {}))
        assert torch.equal(fast, _mixing_weights(hist.gram(), 1e-4, None))


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def model(request):
    if request.param == "tiny":
        torch.manual_seed(0)
        return build_model("tiny", num_classes=4, width=16, head_width=32).eval()
    return load_checkpoint(SHIPPED, device="cpu")[0].eval()


def _entropy_step_by_module_calls(model, x, z_star, step):
    """The feature through the module calls, as it was computed before the layer was bound."""
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        hd = prediction_entropy(model.decode(model.layer(z_star, model.inject(xd))))
        (g,) = torch.autograd.grad(hd.sum(), xd)
    x1 = (x - step * g.sign()).clamp(0.0, 1.0)
    with torch.enable_grad():
        h1 = prediction_entropy(model.decode(model.layer(z_star, model.inject(x1))))
    return hd.detach() - h1.detach()


def test_the_entropy_step_feature_through_the_bound_layer_is_the_module_calls(model):
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_star = model.solve(x, max_iter=10, tol=1e-3).z
    fast = _entropy_step_drop(model, x, z_star, 0.025, create_graph=False)
    assert not fast.requires_grad
    assert torch.equal(fast, _entropy_step_by_module_calls(model, x, z_star, 0.025))
