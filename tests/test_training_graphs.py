"""Captured training forwards (training/graphs.py), checked on a CPU around the capture.

torch's CUDA capture needs a GPU; here an eager stand-in takes its place, so these tests check
everything around it: which forwards are captured and in what form (the attack's with x as the
only input, the update's with the weights as inputs), that each (depth, mode) is captured once,
that the losses and gradients are the bits of the eager training forward, and that a run asking
for graphs on a CPU trains eagerly and says so. bench/train_step.py --cuda-graphs checks the
real capture on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_bench
from test_training_run import tiny_config

from deqguard.models import load_checkpoint
from deqguard.training.config import ObjectiveConfig, config_differences
from deqguard.training.graphs import DepthForward, DepthGraphs
from deqguard.training.loop import Trainer
from deqguard.training.objectives import TrainForward, objective_loss

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "default.safetensors"

torch.set_num_threads(1)


class EagerCapture:
    """Stands in for torch.cuda.make_graphed_callables: records what it was given, runs eager."""

    def __init__(self, model):
        self.model = model
        self.captured: list[tuple[bool, bool, bool]] = []  # (module form, x grad, training)
        self.replays: list[int] = []  # per capture, how often it ran

    def __call__(self, fn, sample):
        self.captured.append((isinstance(fn, DepthForward), sample[0].requires_grad,
                              self.model.training))
        self.replays.append(0)
        index = len(self.replays) - 1

        def replay(x):
            self.replays[index] += 1
            return fn(x)

        return replay


def _loss(model, x, y, *, graphs=None, jacobian: bool = False, kind: str = "pgd-at",
          regulated: bool = True, clean_weight: float = 0.0):
    model.train()
    model.zero_grad(set_to_none=True)
    fwd = TrainForward(model, solver="naive", max_iter=12, tol=1e-2, readout="unrolled",
                       random_depth=regulated, generator=torch.Generator().manual_seed(5),
                       graphs=graphs)
    cfg = ObjectiveConfig(kind=kind, eps=0.1, step_size=0.025, steps=4, beta=6.0,
                          clean_weight=clean_weight)
    jac = {"jacobian_vectors": 2, "jacobian_weight": 1.0} if jacobian else {}
    out = objective_loss(cfg, fwd, x, y, noise=torch.Generator(device=x.device).manual_seed(6),
                         **jac)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out, fwd, grads


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 1, 28, 28, generator=g)
    x[2] *= 0.05
    return x, torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("jacobian", [False, True], ids=["plain", "jacobian"])
def test_graphed_forwards_give_the_eager_bits(batch, jacobian):
    model = load_checkpoint(SHIPPED, device="cpu")[0]
    x, y = batch
    ref, ref_fwd, ref_grads = _loss(model, x, y, jacobian=jacobian)
    capture = EagerCapture(model)
    graphs = DepthGraphs(model, capture=capture)
    got, fwd, grads = _loss(model, x, y, graphs=graphs, jacobian=jacobian)
    assert fwd.depths == ref_fwd.depths
    assert [float(m) for m in fwd.iterations] == [float(m) for m in ref_fwd.iterations]
    assert any(float(m) < d for m, d in zip(fwd.iterations, fwd.depths, strict=True))
    assert torch.equal(got.loss, ref.loss) and torch.equal(got.x_adv, ref.x_adv)
    assert len(grads) == len(ref_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    # 4 attack forwards, each captured once per distinct depth, as a function of x alone
    attack_depths = set(fwd.depths[:4])
    attack = [c for c in capture.captured if c[1]]
    assert len(attack) == len(attack_depths) and all(c == (False, True, False) for c in attack)
    # the update's forward: a module (weights as inputs), train mode; eager with the Jacobian
    update = [c for c in capture.captured if not c[1]]
    assert update == ([] if jacobian else [(True, False, True)])
    assert len(graphs) == len(capture.captured)


@pytest.mark.parametrize("kind", ["pgd-at", "trades"])
def test_an_update_with_two_forwards_replays_a_graph_once(batch, kind):
    """At a fixed depth the clean and the adversarial forward of the update share a graph;
    the second must run eagerly, since both wait for one backward."""
    model = load_checkpoint(SHIPPED, device="cpu")[0]
    x, y = batch
    opts = {"kind": kind, "regulated": False, "clean_weight": 0.5}
    ref, _, ref_grads = _loss(model, x, y, **opts)
    capture = EagerCapture(model)
    got, fwd, grads = _loss(model, x, y, graphs=DepthGraphs(model, capture=capture), **opts)
    assert torch.equal(got.loss, ref.loss) and got.clean_logits is not None
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    update = [r for c, r in zip(capture.captured, capture.replays, strict=True) if c[2]]
    assert update == [1]


def test_a_second_step_replays_what_the_first_captured(batch):
    model = load_checkpoint(SHIPPED, device="cpu")[0]
    x, y = batch
    capture = EagerCapture(model)
    graphs = DepthGraphs(model, capture=capture)
    _, fwd, _ = _loss(model, x, y, graphs=graphs)
    first = len(capture.captured)
    _, again, _ = _loss(model, x, y, graphs=graphs)  # the same depths: nothing new to capture
    assert again.depths == fwd.depths and len(capture.captured) == first
    other = x[:4].clone()  # another batch shape: its own captures
    _loss(model, other, y[:4], graphs=graphs)
    assert len(capture.captured) > first


def test_cuda_graphs_on_a_cpu_train_eagerly_and_say_so(pattern_idx_dir, tmp_path, capsys):
    trainer = Trainer(tiny_config(pattern_idx_dir, "train.cuda_graphs=true"),
                      out_dir=tmp_path / "run", argv=["x"])
    assert trainer.graphs is None
    assert "train.cuda_graphs is for an equilibrium model on CUDA" in capsys.readouterr().err


def test_cuda_graphs_do_not_split_a_run():
    """A run may resume with graphs on or off: the same numbers either way."""
    a = tiny_config(Path("."), "train.cuda_graphs=true").model_dump(mode="json")
    b = tiny_config(Path("."), "train.cuda_graphs=false").model_dump(mode="json")
    assert config_differences(a, b) == []
    assert config_differences(a, b, ignore=frozenset()) == [
        "train.cuda_graphs: True -> False"]


def test_the_benchmarks_graph_check_finds_no_difference_with_the_stand_in(batch, capsys):
    """bench/train_step.py's check of graphs against eager, here with the eager stand-in: it
    compares like with like (same depths and noise), so it must print a difference of 0."""
    bench = load_bench("train_step.py")
    model = load_checkpoint(SHIPPED, device="cpu")[0].train()
    cfg = bench.build_config("fashion-wk-regulated", ["objective.steps=2"])
    graphs = DepthGraphs(model, capture=EagerCapture(model))
    fwd = TrainForward(model, solver="naive", max_iter=12, tol=1e-2, readout="unrolled",
                       random_depth=True, graphs=graphs)
    x, y = batch
    assert bench.compare_with_eager(cfg, model, fwd, x, y, False) == 0.0
    assert len(graphs) > 0 and "|diff| 0" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real capture needs CUDA")
def test_real_captures_give_the_eager_numbers_on_a_gpu(batch):
    """On a GPU: torch's capture itself, against the eager sync-free forward."""
    model = load_checkpoint(SHIPPED, device="cuda")[0]
    x, y = (t.cuda() for t in batch)
    ref, ref_fwd, ref_grads = _loss(model, x, y)
    graphs = DepthGraphs(model)
    got, fwd, grads = _loss(model, x, y, graphs=graphs)
    assert fwd.depths == ref_fwd.depths and len(graphs) > 0
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
