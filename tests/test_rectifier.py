"""The rectifier head: a doubt score trained to doubt (models/rectifier.py), its training term,
its checkpoints, and that a model without it is the network it always was."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from headed import headed_model
from test_training_run import tiny_args

from deqguard.cli import main
from deqguard.models import load_checkpoint, read_metadata, save_checkpoint
from deqguard.models.classifier import SolveResult
from deqguard.models.rectifier import rectified_doubt, rectified_loss
from deqguard.models.selective import SOLVE_DEPENDENT, calibrate, doubt_score
from deqguard.training.objectives import TrainForward, adversarial_ce_loss

HEAD = {"hidden": 16, "trajectory": 3}


def _headed_copy(checkpoint, head=HEAD):
    """The fixture checkpoint's network with a fresh rectifier head (its own copy: trainable)."""
    return headed_model(checkpoint, head, seed=None)


def test_the_doubt_is_one_minus_maxprob_times_sigmoid_a_and_monotone_in_it():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.0, 0.0, 0.0], [5.0, -5.0, 0.0, 1.0]])
    p_max = torch.softmax(logits, dim=1).max(dim=1).values
    a_grid = torch.linspace(-6, 6, 25)
    doubts = torch.stack([rectified_doubt(logits, a.expand(3)) for a in a_grid])  # [25, 3]
    assert torch.allclose(doubts, 1 - p_max[None] * torch.sigmoid(a_grid)[:, None], atol=1e-6)
    assert bool((doubts[1:] < doubts[:-1]).all())  # strictly less doubt as sigmoid(A) grows
    # the served score reads the head's logit that solve() leaves in the result
    result = SolveResult(logits=logits, residual=torch.zeros(1, 3),
                         iterations=torch.ones(3, dtype=torch.long),
                         converged=torch.ones(3, dtype=torch.bool),
                         rectifier=torch.tensor([-1.0, 0.0, 3.0]))
    assert torch.allclose(doubt_score(result, "rectified"),
                          rectified_doubt(logits, result.rectifier))
    assert "rectified" in SOLVE_DEPENDENT


def test_the_bce_target_is_the_detached_true_class_probability():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    a = torch.randn(6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    rectified_loss(logits, a, y).backward()
    p = torch.softmax(logits, dim=1)
    r = p.max(dim=1).values * torch.sigmoid(a)
    for target in (p.gather(1, y[:, None]).squeeze(1).detach(), p.gather(1, y[:, None]).squeeze(1)):
        g_logits, g_a = torch.autograd.grad(F.binary_cross_entropy(r, target), (logits, a),
                                            retain_graph=True)
        if target.requires_grad:  # a target that is not detached gives other gradients
            assert not torch.allclose(g_logits, logits.grad, atol=1e-6)
        else:
            assert torch.allclose(g_logits, logits.grad, atol=1e-6)
            assert torch.allclose(g_a, a.grad, atol=1e-6)


def test_the_training_term_reaches_the_head_on_the_adversarial_batch(tiny_checkpoint,
                                                                     pattern_data):
    model = _headed_copy(tiny_checkpoint)
    x, y = (torch.from_numpy(v)[:16] for v in pattern_data)
    x_adv = (x + 0.05).clamp(0, 1)
    fwd = TrainForward(model, max_iter=6)
    without = adversarial_ce_loss(fwd, x, y, x_adv)
    out = adversarial_ce_loss(fwd, x, y, x_adv, rectifier_weight=0.5)
    assert without.rectifier is None and out.rectifier is not None
    assert torch.allclose(out.loss.detach(), without.loss.detach() + 0.5 * out.rectifier,
                          atol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.rectifier.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_head_learns_which_answers_to_doubt_on_a_fixed_batch(tiny_checkpoint, pattern_data):
    """Backbone frozen, a fixed batch whose second half carries wrong labels (p_y ~ 0 there): the
    BCE falls and the wrongly labelled inputs end up with more doubt than the rest."""
    torch.manual_seed(0)
    model = _headed_copy(tiny_checkpoint)
    x, y = (torch.from_numpy(v)[:24] for v in pattern_data)
    wrong = torch.arange(24) >= 12
    y = torch.where(wrong, (y + 1) % 4, y)
    with torch.no_grad():
        r = model.solve(x)
    state, logits = r.z, r.logits
    from deqguard.models.detection_scores import trajectory_features

    feats = trajectory_features(r, HEAD["trajectory"])
    opt = torch.optim.Adam(model.rectifier.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = rectified_loss(logits, model.rectifier(state, feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        doubt = rectified_doubt(logits, model.rectifier(state, feats))
    assert float(doubt[wrong].min()) > float(doubt[~wrong].max())


def test_a_head_survives_save_and_load(tiny_checkpoint, pattern_data, tmp_path):
    model = _headed_copy(tiny_checkpoint)
    with torch.no_grad():
        for p in model.rectifier.parameters():
            p.add_(0.1)
    path = tmp_path / "headed.safetensors"
    save_checkpoint(model, path, {"classes": ["a", "b", "c", "d"]})
    assert read_metadata(path).model["rectifier"] == HEAD
    back, _ = load_checkpoint(path, device="cpu")
    assert back.rectifier is not None and back.config.rectifier == model.config.rectifier
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    x = torch.from_numpy(pattern_data[0][:8])
    with torch.no_grad():
        a, b = model.solve(x), back.solve(x)
    assert torch.equal(a.rectifier, b.rectifier) and torch.equal(a.logits, b.logits)
    # one image alone gets the same A as in its batch (the server answers image by image)
    with torch.no_grad():
        one = back.solve(x[2:3])
    assert torch.allclose(one.rectifier, b.rectifier[2:3], atol=1e-5)


def test_a_checkpoint_without_a_head_is_the_network_it_was(tiny_checkpoint, pattern_data):
    """The shipped default was written before heads existed; the fixture after, without one:
    both store the same config keys (no `rectifier` entry)."""
    assert "rectifier" not in read_metadata("default").model
    shipped, _ = load_checkpoint("default", device="cpu")
    assert shipped.rectifier is None
    assert "rectifier" not in read_metadata(tiny_checkpoint).model
    model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    assert model.rectifier is None
    assert not any(k.startswith("rectifier") for k in model.state_dict())
    with torch.no_grad():
        r = model.solve(torch.from_numpy(pattern_data[0][:4]))
    assert r.rectifier is None
    with pytest.raises(ValueError, match="rectifier head"):
        doubt_score(r, "rectified")


def test_served_traces_carry_the_head_through_split_and_pickle(tiny_checkpoint, pattern_data):
    from deqguard.serving.options import SolveOptions
    from deqguard.serving.selective import Selector
    from deqguard.serving.traces import split_batch

    model = _headed_copy(tiny_checkpoint)
    x = torch.from_numpy(pattern_data[0][:5])
    with torch.no_grad():
        r = model.solve(x)
    traces = split_batch(r)
    want = doubt_score(r, "rectified")
    for i, t in enumerate(traces):
        again = pickle.loads(pickle.dumps(t))
        for tr in (t, again):
            assert torch.allclose(doubt_score(tr.as_result(), "rectified"), want[i:i + 1])
    cal = calibrate(want.numpy(), "rectified", (0.5,))
    sel = Selector(cal)
    opts = SolveOptions(max_iter=30, tol=1e-3, solver="anderson", coverage=0.5)
    assert sel.problem(opts, features=True) is None
    assert "rectifier head" in sel.problem(opts, features=False)
    abstained, block = sel(traces[0], opts)
    assert block.score_name == "rectified" and block.score == pytest.approx(float(want[0]))


def test_head_only_fine_tune_from_a_checkpoint_keeps_its_network(pattern_idx_dir, tmp_path,
                                                                capsys):
    parent_dir = tmp_path / "parent"
    assert main(tiny_args(pattern_idx_dir, parent_dir, epochs=1)) == 0
    parent_path = parent_dir / "last.safetensors"
    head = ["--set", "model.overrides.rectifier.hidden=8",
            "--set", "model.overrides.rectifier.trajectory=2"]
    child_dir = tmp_path / "child"
    assert main(tiny_args(pattern_idx_dir, child_dir, "--init", str(parent_path), *head,
                          "--set", "rectifier.weight=1", "--set", "rectifier.freeze_backbone=true",
                          epochs=1)) == 0
    parent, _ = load_checkpoint(parent_path, device="cpu")
    child, meta = load_checkpoint(child_dir / "last.safetensors", device="cpu")
    assert meta.model["rectifier"] == {"hidden": 8, "trajectory": 2}
    assert meta.training["config"]["rectifier"] == {"weight": 1.0, "freeze_backbone": True}
    want = parent.state_dict()
    body = {k: v for k, v in child.state_dict().items() if not k.startswith("rectifier.")}
    assert body.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in body.items())
    rows = [json.loads(line) for line in (child_dir / "train_log.jsonl").read_text().splitlines()]
    bce = [r["train_rectifier_bce"] for r in rows if "train_rectifier_bce" in r]
    assert len(bce) == 1 and math.isfinite(bce[0]) and bce[0] > 0
    capsys.readouterr()
    # a weight without a head, and a frozen backbone with nothing to train, are clear errors
    assert main(tiny_args(pattern_idx_dir, tmp_path / "nohead", "--set", "rectifier.weight=1",
                          epochs=1)) == 2
    assert "rectifier head" in capsys.readouterr().err
    assert main(tiny_args(pattern_idx_dir, tmp_path / "frozen", *head,
                          "--set", "rectifier.freeze_backbone=true", epochs=1)) == 2
    assert "rectifier.weight" in capsys.readouterr().err


@pytest.mark.parametrize("trajectory", [0, 3])
def test_the_attack_aimed_at_the_head_raises_its_objective_inside_the_ball(
        tiny_checkpoint, pattern_data, trajectory):
    from deqguard.evaluation.rectifier_attack import rectifier_aware_pgd, rectifier_objective

    model = _headed_copy(tiny_checkpoint, {"hidden": 16, "trajectory": trajectory})
    x, y = (torch.from_numpy(v)[:8] for v in pattern_data)
    eps = 0.1
    x_adv = rectifier_aware_pgd(model, x, y, eps=eps, lam=1.0, steps=5, seed=0)
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        before = rectifier_objective(model, x, y, 1.0).mean()
        after = rectifier_objective(model, x_adv, y, 1.0).mean()
    assert float(after) > float(before)
    # lam = 0 is plain CE-PGD: the head term is what moves the attack elsewhere
    plain = rectifier_aware_pgd(model, x, y, eps=eps, lam=0.0, steps=5, seed=0)
    assert not torch.equal(plain, x_adv)


def _mixed_stopping_tol(model, x) -> float:
    """A tolerance half the batch passes at its first step's residual and half does not, so
    the solve has samples that stop while others iterate (their feature rows must repeat)."""
    with torch.no_grad():
        first = model.solve(x, max_iter=3).residual[1].sort().values
    half = len(first) // 2
    return float(first[half - 1] + first[half]) / 2


@pytest.mark.parametrize("solver", ["anderson", "naive"])
@pytest.mark.parametrize("length", [3, 40])
def test_the_graph_trajectory_features_are_the_served_ones_and_carry_a_gradient(
        tiny_checkpoint, pattern_data, solver, length):
    from deqguard.models.detection_scores import trajectory_features

    model = _headed_copy(tiny_checkpoint, {"hidden": 16, "trajectory": length})
    x = torch.from_numpy(pattern_data[0][:8])
    tol = _mixed_stopping_tol(model, x)
    with torch.no_grad():
        served = model.solve(x, solver=solver, tol=tol)
    iters = served.iterations
    assert int(iters.min()) < int(iters.max())  # some rows past a sample's own steps
    xr = x.clone().requires_grad_(True)
    eq = model.equilibrium(xr, solver=solver, tol=tol, grad="exact", keep_states=True)
    feats = model.graph_trajectory_features(eq, length)
    assert torch.equal(eq.output.iterations, iters)
    assert torch.allclose(feats.detach(), trajectory_features(served, length), atol=1e-5,
                          rtol=0)
    assert torch.allclose(model.rectifier(eq.z, feats).detach(), served.rectifier, atol=1e-5,
                          rtol=0)
    # both halves (entropies, log residuals) reach x; the recorded ones have no graph at all
    assert not trajectory_features(served, length).requires_grad
    for part in (feats[:, 1:length], feats[:, length + 1:]):
        (g,) = torch.autograd.grad(part.sum(), xr, retain_graph=True)
        assert float(g.abs().sum()) > 0


def test_the_attack_differentiates_the_trajectory_the_head_reads(tiny_checkpoint,
                                                                 pattern_data):
    from deqguard.evaluation.rectifier_attack import rectifier_logits

    model = _headed_copy(tiny_checkpoint, {"hidden": 16, "trajectory": 3})
    x = torch.from_numpy(pattern_data[0][:8]).requires_grad_(True)
    _, a = rectifier_logits(model, x)
    (full,) = torch.autograd.grad(a.sum(), x)
    eq = model.equilibrium(x, grad="exact", keep_states=True)
    held = model.rectifier(eq.z, model.graph_trajectory_features(eq, 3).detach())
    (state_only,) = torch.autograd.grad(held.sum(), x)
    assert torch.allclose(a.detach(), held.detach())
    # with the path features held constant the gradient is another one
    assert not torch.allclose(full, state_only, atol=1e-6)
