"""The fast solve path gives the reference path's answers.

`model.solve` binds the layer to its weights, evaluates f only on samples still iterating and
decodes the trajectory once after the loop; `reference=True` runs the plain step-by-step path
(module calls, every sample every step, a decode per step). Same options, same answers: logits
within 1e-5, the same labels, stop reasons and iteration counts, alone and batched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deqguard.models import build_model, load_checkpoint
from deqguard.models.anytime import SettleRule

SOLVERS = ["naive", "anderson", "broyden"]
TOL = 1e-3
CLOSE = {"rtol": 0.0, "atol": 1e-5}
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "default.safetensors"


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def model(request):
    """A tiny DEQ at random init, and the shipped default (a trained deq-wk: at random init
    it does not converge, and no sample would stop before another)."""
    if request.param == "tiny":
        torch.manual_seed(0)
        return build_model("tiny", num_classes=4, width=16, head_width=32).eval()
    return load_checkpoint(SHIPPED, device="cpu")[0].eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 28, 28, generator=g)
    x[2] *= 0.05  # a very different sample, so that batch mates need different step counts
    x[4] = x[4] ** 4
    return x


def _same_answers(fast, ref) -> None:
    torch.testing.assert_close(fast.logits, ref.logits, **CLOSE)
    assert torch.equal(fast.logits.argmax(-1), ref.logits.argmax(-1))
    assert torch.equal(fast.iterations, ref.iterations)
    assert torch.equal(fast.converged, ref.converged)
    assert torch.equal(fast.stopped, ref.stopped)
    torch.testing.assert_close(fast.residual, ref.residual, **CLOSE)
    torch.testing.assert_close(fast.entropy, ref.entropy, **CLOSE)
    torch.testing.assert_close(fast.z, ref.z, **CLOSE)


@pytest.mark.parametrize("settle", [None, SettleRule(2, 0.5)], ids=["plain", "settle"])
@pytest.mark.parametrize("name", SOLVERS)
def test_fast_path_gives_the_reference_answers_alone_and_batched(model, inputs, name, settle):
    opts = {"solver": name, "max_iter": 25, "tol": TOL, "settle": settle}
    with torch.inference_mode():
        batch = model.solve(inputs, **opts)
        _same_answers(batch, model.solve(inputs, reference=True, **opts))
        for i in range(len(inputs)):
            alone = model.solve(inputs[i:i + 1], **opts)
            _same_answers(alone, model.solve(inputs[i:i + 1], reference=True, **opts))
    if settle is None:
        # samples stopped at different steps, so the fast path really skipped some
        assert len(set(batch.iterations.tolist())) > 1


def _count_rows(model):
    """Wrap the model's bound layer so that every row f is evaluated on is counted."""
    rows: list[int] = []
    bind = type(model).layer_fn

    def counting_layer_fn():
        layer = bind(model)

        def counted(z, u):
            rows.append(z.shape[0])
            return layer(z, u)
        return counted

    model.layer_fn = counting_layer_fn
    return rows


@pytest.mark.parametrize("name", SOLVERS)
def test_stopped_samples_are_not_evaluated(model, inputs, name):
    """At step t f runs on the samples still iterating (at least two rows of a batch of
    several), not on the whole batch: a batch waits for its slowest sample at the price of
    that sample alone."""
    rows = _count_rows(model)
    try:
        with torch.inference_mode():
            r = model.solve(inputs, solver=name, max_iter=25, tol=TOL)
    finally:
        del model.layer_fn
    b, steps = len(inputs), r.residual.shape[0]
    expected = []
    for t in range(1, steps + 1):
        n = int((r.iterations >= t).sum())
        expected.append(b if n == b else max(n, 2))
    assert rows == expected
    assert sum(rows) < b * steps


def test_a_lone_survivor_runs_as_a_pair(model, inputs):
    """Once one sample of a batch is left it is evaluated twice over, never alone: a batch of one
    takes other kernels, and its answer would then depend on when its batch mates stopped."""
    opts = {"solver": "anderson", "max_iter": 25, "tol": TOL}
    with torch.inference_mode():
        its = model.solve(inputs, **opts).iterations
    x = inputs[[int(its.argmin()), int(its.argmax())]]  # one fast sample, one slow
    rows = _count_rows(model)
    try:
        with torch.inference_mode():
            r = model.solve(x, **opts)
    finally:
        del model.layer_fn
    assert r.iterations[0] != r.iterations[1]
    assert min(rows) == 2


def test_the_bound_layer_carries_the_training_gradient(model, inputs):
    """Training solves through the bound layer too: the phantom gradient reaches every weight,
    weight-normed convolutions included, exactly as through the module calls."""
    grads = {}
    for reference in (True, False):
        model.zero_grad()
        eq = model.equilibrium(inputs, solver="anderson", max_iter=10, tol=TOL, grad="phantom",
                               reference=reference)
        model.decode(eq.z).logsumexp(-1).sum().backward()
        grads[reference] = {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any("cell.conv1" in n for n in grads[False])
    for n, g in grads[True].items():
        torch.testing.assert_close(grads[False][n], g, rtol=1e-5, atol=1e-6)
    model.zero_grad()
