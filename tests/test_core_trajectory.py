"""Per-sample stopping and the entropy/residual trajectories of `model.solve`."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from deqguard.models import build_model, prediction_entropy

SOLVERS = ["naive", "anderson", "broyden"]
TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=4, width=16, head_width=32).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 28, 28, generator=g)
    x[3] *= 0.05  # a very different sample, so that batch mates need different step counts
    return x


# float64 shows that the masking logic is exact (differences at rounding level); float32 shows
# what users see: batched convolution kernels differ from single-sample ones in the last bits.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name", SOLVERS)
def test_sample_result_does_not_depend_on_batch_mates(tiny_model, inputs, name, dtype, tol):
    model = copy.deepcopy(tiny_model).to(dtype)
    x = inputs.to(dtype)
    close = functools.partial(torch.testing.assert_close, rtol=tol, atol=tol)
    with torch.no_grad():
        batch = model.solve(x, solver=name, max_iter=40, tol=TOL, keep_states=True)
        for i in range(len(x)):
            alone = model.solve(x[i:i + 1], solver=name, max_iter=40, tol=TOL, keep_states=True)
            t = alone.residual.shape[0]
            assert int(alone.iterations[0]) == int(batch.iterations[i])
            assert bool(alone.converged[0]) == bool(batch.converged[i])
            close(alone.logits[0], batch.logits[i])
            close(alone.residual[:, 0], batch.residual[:t, i])
            close(alone.entropy[:, 0], batch.entropy[:t, i])
            for s_alone, s_batch in zip(alone.states, batch.states[:t], strict=True):
                close(s_alone[0], s_batch[i])
    # The batch really mixed different step counts, or the test would prove nothing.
    assert len(set(batch.iterations.tolist())) > 1


@pytest.mark.parametrize("name", SOLVERS)
def test_converged_samples_stop_changing(tiny_model, inputs, name):
    with torch.no_grad():
        r = tiny_model.solve(inputs, solver=name, max_iter=40, tol=TOL, keep_states=True)
    steps = r.residual.shape[0]
    for i in range(len(inputs)):
        k = int(r.iterations[i])
        for t in range(k, steps):
            assert torch.equal(r.states[t][i], r.states[k - 1][i])
            assert r.residual[t, i] == r.residual[k - 1, i]
            assert r.entropy[t, i] == r.entropy[k - 1, i]
        assert torch.equal(r.z[i], r.states[k - 1][i])


@pytest.mark.parametrize("name", SOLVERS)
def test_entropy_trajectory_is_head_entropy_of_each_iterate(tiny_model, inputs, name):
    with torch.no_grad():
        r = tiny_model.solve(inputs, solver=name, max_iter=15, tol=TOL, keep_states=True)
        assert r.entropy.shape == r.residual.shape == (len(r.states), len(inputs))
        for t, state in enumerate(r.states):
            expected = prediction_entropy(tiny_model.decode(state))
            torch.testing.assert_close(r.entropy[t], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.logits, tiny_model.decode(r.states[-1]))
    assert bool((r.entropy >= 0).all())
    assert bool((r.entropy <= torch.log(torch.tensor(4.0)) + 1e-5).all())


@pytest.mark.parametrize("name", SOLVERS)
def test_iterations_and_converged_agree_with_tol(tiny_model, inputs, name):
    max_iter = 40
    with torch.no_grad():
        r = tiny_model.solve(inputs, solver=name, max_iter=max_iter, tol=TOL)
    assert r.residual.shape == (int(r.iterations.max()), len(inputs))
    for i in range(len(inputs)):
        k = int(r.iterations[i])
        res = r.residual[:k, i]
        # Stopped at the first residual under tol, or ran out of budget.
        assert bool((res[:-1] >= TOL).all())
        assert bool(r.converged[i]) == bool(res[-1] < TOL)
        if not r.converged[i]:
            assert k == max_iter
    assert bool(r.converged.all())  # at random init the tiny DEQ converges well within 40


def test_tight_budget_leaves_samples_unconverged(tiny_model, inputs):
    with torch.no_grad():
        r = tiny_model.solve(inputs, solver="naive", max_iter=2, tol=1e-6)
    assert r.iterations.tolist() == [2] * len(inputs)
    assert not bool(r.converged.any())


def test_solve_without_trajectory_matches_forward(tiny_model, inputs):
    with torch.no_grad():
        r = tiny_model.solve(inputs, solver="anderson", max_iter=30, tol=TOL, trajectory=False)
        logits = tiny_model(inputs, solver="anderson", max_iter=30, tol=TOL)
    assert r.entropy is None and r.states is None
    torch.testing.assert_close(r.logits, logits, rtol=0, atol=0)


def test_unrolled_readout_value_is_the_same_with_and_without_grad(tiny_model, inputs):
    with torch.no_grad():
        no_grad = tiny_model(inputs, readout="unrolled")
        state = tiny_model(inputs, readout="state")
    with_grad = tiny_model(inputs, readout="unrolled")
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(no_grad, state, rtol=0, atol=1e-7)
