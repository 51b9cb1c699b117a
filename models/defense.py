"""The paper's inference-time defense (Sec 3.2): input entropy reduction along the dynamics.

An adversarial input tends to leave the DEQ's intermediate states uncertain (high prediction
entropy). The defense interleaves solver steps with signed-gradient steps on a copy x' of the
input that lower that entropy, staying within `eps` of the received input and in [0, 1]
(paper.md 3.1). One implementation is shared by evaluation and by the server, so that what is
evaluated is what is served.

Simplification, documented: each round restarts the chosen solver from the current state
(`model.equilibrium(..., z0=z)`) instead of carrying the Broyden low-rank memory over and
rank-one "lifting" it to the new injection as the paper's code does. The solver is therefore a
little less accelerated across rounds; the states visited still follow the purified dynamics.
The paper's last round of input steps changes nothing that is read out (the readout is the last
iterate computed *before* those steps), so it is skipped here.

Gradient through the defense for adaptive attacks (`bpda_logits`), BPDA (Athalye et al. 2018):
the forward value is always the defended prediction, and the input updates are straight-through,
i.e. each round's purified input is x~_r = x + stop_grad(x'_r - x), so d x~_r / d x = I.
- grad="exact" (default): backprop through every solver step of every round, each round's
  injection inject(x~_r) and the state carried between rounds; only the signed-gradient input
  updates are replaced by the identity. This is the gradient of the defended forward "as if
  x' = x" in the input-update steps and exact everywhere else.
- grad="phantom" / "implicit": the readout state z_r is treated as an equilibrium of
  f(., inject(x~)) with x~ = x + stop_grad(x'_readout - x), and the gradient is the model's
  phantom unroll / implicit adjoint from the detached z_r. Cheaper, but z_r is an early,
  unconverged iterate, so this surrogate can be weak (the evaluation reports both).
- grad="full" (`FULL_GRADIENT`): no straight-through at all. The input updates
  x' <- clip(x' - a sign(g)) are differentiated as they are: sign(g) is piecewise constant, so
  its derivative is zero almost everywhere and the exact gradient of an update is the identity
  except where the clip to [0, 1] binds (there it is zero). This is the exact gradient of the
  defended forward; it differs from grad="exact" only on pixels the defense pushes against the
  image range (most of a Fashion-MNIST background), which is why both are attacked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .classifier import Classifier, DEQClassifier, SolveResult
from .config import GradConfig
from .entropy import prediction_entropy
from .grad import attach_gradient

# The gradient path of `bpda_logits` that differentiates the input updates too (module doc).
FULL_GRADIENT = "full"


def default_eps(in_channels: int, image_size: int) -> float:
    """The threat-model radius the project uses: 0.1 for 28x28 grey images, 8/255 otherwise."""
    return 0.1 if in_channels == 1 and image_size == 28 else 8 / 255


class EntropyReductionConfig(BaseModel):
    """Settings of the Sec 3.2 defense; defaults are the paper's (4 x 2 Broyden steps, R = 10).

    `eps` is the radius around the *received* input; None means "use the caller's value, else
    `default_eps` for the model's input shape". `step_size` None means eps / 4 (the paper's
    2/255 for 8/255). `readout` picks the purified iterate that gives the prediction: "last" is
    the last one (the paper's state #8), an int k is the k-th iterate (1-based).
    """

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(4, ge=1, le=100)
    solver_steps_per_round: int = Field(2, ge=1, le=100)
    input_steps: int = Field(10, ge=0, le=1000)
    eps: float | None = Field(None, ge=0)
    step_size: float | None = Field(None, gt=0)
    readout: int | Literal["last"] = "last"

    def resolved(self, model: Classifier, eps: float | None = None) -> EntropyReductionConfig:
        """A copy with eps and step size filled in (explicit `eps` wins over the config's)."""
        e = eps if eps is not None else self.eps
        if e is None:
            e = default_eps(model.config.in_channels, model.config.image_size)
        step = self.step_size if self.step_size is not None else e / 4
        return self.model_copy(update={"eps": float(e), "step_size": float(step)})


@dataclass
class DefenseTrace:
    """A defended solve plus what adaptive attacks need: the input behind the readout state."""

    result: SolveResult
    x_readout: Tensor  # the purified input x' the readout state was computed with
    x_final: Tensor  # x' after the last round of input steps that ran


def _entropy_input_steps(model: DEQClassifier, z: Tensor, x_cur: Tensor, x0: Tensor,
                         steps: int, eps: float, step: float, *,
                         keep_graph: bool = False) -> Tensor:
    """Signed-gradient descent on H(decode(f(z, inject(x')))) with z held fixed (paper.md 3.1).

    `keep_graph` keeps x_cur's and x0's graph through the steps and clips (the sign has no
    gradient): the exact derivative of the updates, for grad="full" attacks.
    """
    z = z.detach()
    x_adv = x_cur if keep_graph else x_cur.detach()
    if not keep_graph:
        x0 = x0.detach()
    for _ in range(steps):
        leaf = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            h = prediction_entropy(model.decode(model.layer(z, model.inject(leaf)))).sum()
            (g,) = torch.autograd.grad(h, leaf)
        x_adv = x_adv - step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return x_adv if keep_graph else x_adv.detach()


def _compact(rounds: list[Tensor], counts: Tensor) -> Tensor:
    """Per-round [T_r, B] rows -> [T, B] with each sample's own steps back to back.

    Within a round, a sample that stopped early repeats its last row up to the batch's longest
    round; concatenating rounds as they are would put those repeats in the middle of its
    trajectory and make it depend on its batch mates. Here sample b gets rows[:counts[r, b]] of
    every round in order, then its last value repeated (the solvers' convention).
    """
    rows = torch.cat(rounds)  # [sum T_r, B]
    offsets = torch.tensor([0] + [r.shape[0] for r in rounds[:-1]],
                           device=rows.device).cumsum(0)
    total = counts.sum(0)  # [B]
    length = int(total.max())
    out = rows.new_empty(length, rows.shape[1])
    for b in range(rows.shape[1]):
        idx = torch.cat([offsets[r] + torch.arange(int(counts[r, b]), device=rows.device)
                         for r in range(len(rounds))])
        col = rows[idx, b]
        out[:, b] = torch.cat([col, col[-1:].expand(length - col.shape[0])])
    return out


def entropy_reduction_trace(model: Classifier, x: Tensor,
                            cfg: EntropyReductionConfig | None = None, *,
                            solver: str | None = None, max_iter: int | None = None,
                            tol: float | None = None, trajectory: bool = True,
                            eps: float | None = None,
                            straight_through: bool = False,
                            exact_updates: bool = False) -> DefenseTrace:
    """Run the defended dynamics; see `entropy_reduction_solve` for the arguments.

    `straight_through=True` keeps a graph from x to the readout logits: solver steps under
    exact autograd, input updates as the identity (see the module doc, grad="exact");
    with `exact_updates` too, the input updates are differentiated as well (grad="full").
    """
    if not model.is_deq:
        raise ValueError("input entropy reduction needs a DEQ model (it acts along the dynamics)")
    assert isinstance(model, DEQClassifier)
    cfg = (cfg or EntropyReductionConfig()).resolved(model, eps)
    steps = cfg.solver_steps_per_round
    total = cfg.rounds * steps if max_iter is None else int(max_iter)
    if total < 1:
        raise ValueError("the defense needs at least one solver step")
    rounds = math.ceil(total / steps)
    readout = total if cfg.readout == "last" else int(cfg.readout)
    if not 1 <= readout <= total:
        raise ValueError(f"readout iterate {readout} is outside 1..{total}")

    grad_mode = torch.enable_grad() if straight_through else torch.no_grad()
    with torch.inference_mode(False):
        x0 = x.detach().clone()
        exact_updates = exact_updates and straight_through
        if exact_updates:
            x0 = x  # the clips' bounds x0 +- eps carry x's gradient too
        x_cur = x0
        z: Tensor | None = None
        entropies, residuals, iters = [], [], torch.zeros(x.shape[0], dtype=torch.long,
                                                          device=x.device)
        done, converged, z_read, x_read = 0, None, None, x0
        counts_per_round: list[Tensor] = []
        with grad_mode:
            for r in range(rounds):
                k = min(steps, total - done)
                x_in = (x + (x_cur - x).detach() if straight_through and not exact_updates
                        else x_cur)
                eq = model.equilibrium(x_in, solver=solver, max_iter=k, tol=tol,
                                       trajectory=trajectory, keep_states=True, z0=z,
                                       grad="exact" if straight_through else None)
                out = eq.output
                states = out.states or [eq.z]
                # The solver can stop early (all samples under tol): pad with the last state.
                states = states + [states[-1]] * (k - len(states))
                if done < readout <= done + k:
                    z_read, x_read = states[readout - done - 1], x_cur
                if trajectory and eq.entropy is not None:
                    entropies.append(eq.entropy)
                residuals.append(out.residual)
                counts_per_round.append(out.iterations)
                iters = iters + out.iterations
                converged = out.converged
                z = eq.z if straight_through else eq.z_star
                done += k
                if r < rounds - 1 and cfg.input_steps > 0:
                    x_cur = _entropy_input_steps(model, z, x_cur, x0, cfg.input_steps,
                                                 cfg.eps, cfg.step_size,
                                                 keep_graph=exact_updates)
            assert z_read is not None and converged is not None
            logits = model.decode(z_read)
        counts = torch.stack(counts_per_round)
        x_read, x_cur = x_read.detach(), x_cur.detach()
        result = SolveResult(
            logits=logits, residual=_compact(residuals, counts), iterations=iters,
            converged=converged,
            entropy=_compact(entropies, counts) if trajectory and entropies else None,
            z=z_read.detach())
    return DefenseTrace(result=result, x_readout=x_read, x_final=x_cur)


def entropy_reduction_solve(model: Classifier, x: Tensor,
                            cfg: EntropyReductionConfig | None = None, *,
                            solver: str | None = None, max_iter: int | None = None,
                            tol: float | None = None, trajectory: bool = True,
                            eps: float | None = None) -> SolveResult:
    """Defended prediction with its trajectory along the purified dynamics.

    `max_iter`, when given, replaces rounds x solver_steps_per_round as the total number of
    solver steps (the last round is shortened). `tol` lets a round stop early; the next round's
    new injection makes the state move again. `entropy` and `residual` are [T, B] over all
    rounds. No gradient flows out of the result: use `bpda_logits` for attacks.
    """
    return entropy_reduction_trace(model, x, cfg, solver=solver, max_iter=max_iter, tol=tol,
                                   trajectory=trajectory, eps=eps).result


def bpda_logits(model: Classifier, x: Tensor, cfg: EntropyReductionConfig | None = None, *,
                solver: str | None = None, max_iter: int | None = None, tol: float | None = None,
                grad: GradConfig | str | None = "exact", eps: float | None = None) -> Tensor:
    """Defended logits for adaptive attacks: exact forward value, BPDA gradient (module doc).

    `grad` is a solver gradient path (BPDA: the input updates pass the gradient through as
    the identity) or `FULL_GRADIENT` (the exact gradient, input updates included).
    """
    assert isinstance(model, DEQClassifier)
    if grad == FULL_GRADIENT:
        return entropy_reduction_trace(model, x, cfg, solver=solver, max_iter=max_iter, tol=tol,
                                       trajectory=False, eps=eps, straight_through=True,
                                       exact_updates=True).result.logits
    gcfg = model._grad_config(grad)
    if gcfg.mode == "exact":
        return entropy_reduction_trace(model, x, cfg, solver=solver, max_iter=max_iter, tol=tol,
                                       trajectory=False, eps=eps,
                                       straight_through=True).result.logits
    trace = entropy_reduction_trace(model, x.detach(), cfg, solver=solver, max_iter=max_iter,
                                    tol=tol, trajectory=False, eps=eps)
    z_r = trace.result.z
    assert z_r is not None
    x_tilde = x + (trace.x_readout - x).detach()  # value x', gradient identity to x
    u = model.inject(x_tilde)
    z = attach_gradient(lambda s: model.layer(s, u), z_r, gcfg, straight_through=True)
    return model.decode(z)


class DefendedClassifier(torch.nn.Module):
    """`model` behind the defense as a plain logits module (AutoAttack, PGD wrappers).

    The forward value is the defended prediction; gradients are BPDA, or exact with
    grad=`FULL_GRADIENT` (`bpda_logits`).
    """

    def __init__(self, model: Classifier, cfg: EntropyReductionConfig | None = None, *,
                 eps: float | None = None, grad: GradConfig | str | None = "exact"):
        super().__init__()
        self.model = model
        self.cfg = (cfg or EntropyReductionConfig()).resolved(model, eps)
        self.grad = grad
        self.config = model.config

    def forward(self, x: Tensor) -> Tensor:
        return bpda_logits(self.model, x, self.cfg, grad=self.grad)
