"""The attack on a selective answer: a wrong answer that the doubt score lets through.

PGD-40 aims at any wrong answer; a wrong answer the service abstains on costs the caller nothing.
An attacker who knows the served doubt score s and its threshold tau aims at an input with
`argmax != y` AND `s(x) <= tau`. Per sample, two stages share one objective:

- stage 1 (the answer is still right): the usual losses, CE or DLR untargeted, or the targeted
  DLR of APGD-T towards one of the top wrong classes of the clean answer;
- stage 2 (wrong): maximise min(m_wrong, m_accept), m_wrong = max_{j != y} z_j - z_y (> 0: wrong)
  and m_accept > 0 iff the score answers (below). Its sign is the goal: lowering the doubt stops
  once the answer is about to turn right again, and the two margins then grow together.

m_accept is in log units for the non-negative scores, log(tau) - log(s), so that it is on the
scale of a logit margin; the learned detector's score is already a log-odds: tau - s. Every score
is differentiated exactly through the solver (backprop through every iteration, the states kept
for the trajectory scores); the detector through its differentiable dynamics features
(detector_attack.py). `iterations` counts steps, which has no gradient: its surrogate is the
relative residual of the iterate z_k, k = floor(tau) - 1, whose step k + 1 must pass the
tolerance for the solve to stop within tau steps: m_accept = log(tol) - log(res(z_k)). The
decision always uses the real score of the same solve (for iterations, its step count).

The step schedule is APGD's (Croce & Hein 2020): step 2 eps, momentum 0.75, halved at
checkpoints where fewer than 75% of the steps since the last one raised the objective or where
the best did not move, restarting from the best point. Per sample the best input over every run
is kept in the order wrong-and-answered > wrong > right (then by the objective); the searches
stop on samples that reached the first tier. Every iterate is projected into the eps-ball and
[0, 1] (training/attacks.py `project_linf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.models.classifier import Classifier, DEQClassifier
from deqguard.models.entropy import mean_over_own_iterates, prediction_entropy
from deqguard.models.rectifier import rectified_doubt
from deqguard.models.solvers.base import residual
from deqguard.training.attacks import project_linf

Loss = Literal["ce", "dlr"]
LOSSES: tuple[str, ...] = ("ce", "dlr")
# Scores whose surrogate needs the DEQ's solver path (not defined by a feedforward's logits).
DEQ_ONLY: frozenset[str] = frozenset({"detector", "iterations", "mean_entropy", "rectified"})
_TINY = 1e-12
_TIER = 1e6  # the objective of a lower tier never reaches a higher tier's


@dataclass
class Goal:
    """What the attack aims at: a wrong answer that the score `name` answers at `tau`."""

    name: str
    tau: float
    detector: Any = None  # a LogisticDetector for name == "detector"


@dataclass
class Forward:
    """One differentiable solve: logits, the real score and the answer margin, all [B]."""

    logits: Tensor
    score: Tensor  # the served score's value (detached); for iterations the step count
    accept_margin: Tensor  # > 0: answered; differentiable


def _log_margin(tau: float, s: Tensor) -> Tensor:
    return math.log(max(tau, _TINY)) - torch.log(s.clamp_min(_TINY))


def surrogate_forward(model: Classifier, x: Tensor, goal: Goal) -> Forward:
    """The served solve under exact autograd, with the goal's score and its answer margin."""
    if not model.is_deq:
        if goal.name in DEQ_ONLY:
            raise ValueError(f"the {goal.name} score needs a DEQ")
        logits = model(x)
        return _from_logits(logits, goal)
    assert isinstance(model, DEQClassifier)
    if goal.name == "detector":
        from .detector_attack import surrogate_score_and_logits

        s, logits = surrogate_score_and_logits(model, goal.detector, x)
        return Forward(logits, s.detach(), goal.tau - s)
    if goal.name == "rectified":
        # The gradient reaches A through the state and through the trajectory inputs a head
        # may read (recomputed from the kept iterates with their graph).
        from .rectifier_attack import rectifier_logits

        logits, a = rectifier_logits(model, x)
        s = rectified_doubt(logits, a)
        return Forward(logits, s.detach(), _log_margin(goal.tau, s))
    trajectory = goal.name in ("mean_entropy", "iterations")
    eq = model.equilibrium(x, grad="exact", keep_states=trajectory)
    logits = model.decode(eq.z)
    if goal.name == "mean_entropy":
        states = eq.output.states or [eq.z]
        rows = torch.stack([prediction_entropy(model.decode(z)) for z in states])
        s = mean_over_own_iterates(rows, eq.output.iterations)
        return Forward(logits, s.detach(), _log_margin(goal.tau, s))
    if goal.name == "iterations":
        k = max(int(math.floor(goal.tau + 1e-9)) - 1, 0)
        states = eq.output.states or []
        if k == 0 or not states:
            zk = model.initial_state(model.inject(x))
        else:
            zk = states[min(k, len(states)) - 1]
        res = residual(eq.f(zk), zk, "rel")
        tol = float(model.config.solver.tol)
        margin = math.log(tol) - torch.log(res.clamp_min(_TINY))
        return Forward(logits, eq.output.iterations.to(logits.dtype).detach(), margin)
    return _from_logits(logits, goal)


def _from_logits(logits: Tensor, goal: Goal) -> Forward:
    if goal.name == "max_softmax":
        s = 1.0 - torch.softmax(logits, dim=-1).max(dim=-1).values
    elif goal.name in ("final_entropy", "mean_entropy"):  # a feedforward has one iterate
        s = prediction_entropy(logits)
    else:
        raise ValueError(f"no surrogate for the doubt score {goal.name!r}")
    return Forward(logits, s.detach(), _log_margin(goal.tau, s))


# -- losses ----------------------------------------------------------------------------------

def wrong_margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j - z_y: positive iff the answer is wrong."""
    other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return other - logits.gather(1, y[:, None])[:, 0]


def dlr(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """APGD's difference-of-logits ratio (to maximise), untargeted or towards `target`."""
    srt = logits.sort(dim=1, descending=True).values
    if target is None:
        return wrong_margin(logits, y) / (srt[:, 0] - srt[:, 2] + _TINY)
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + _TINY)


def stage_one(logits: Tensor, y: Tensor, loss: Loss, target: Tensor | None) -> Tensor:
    if target is not None:
        return dlr(logits, y, target)
    if loss == "dlr":
        return dlr(logits, y)
    return F.cross_entropy(logits, y, reduction="none")


def objective(fw: Forward, y: Tensor, goal: Goal, loss: Loss, target: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss to ascend [B], tier [B] in {0, 1, 2}, progress [B] ordered by tier then loss)."""
    m_wrong = wrong_margin(fw.logits, y)
    wrong = (fw.logits.argmax(1) != y).detach()
    answered = fw.score <= goal.tau
    tier = wrong.long() * (1 + answered.long())
    stage2 = torch.minimum(m_wrong, fw.accept_margin)
    value = torch.where(wrong, stage2, stage_one(fw.logits, y, loss, target))
    progress = tier.to(value.dtype) * _TIER + value.detach().clamp(-_TIER / 10, _TIER / 10)
    return value, tier, progress


# -- the search -------------------------------------------------------------------------------

@dataclass
class Best:
    """Per sample the best input so far over every run: tier, then objective within a run."""

    x: Tensor
    tier: Tensor
    progress: Tensor
    run: Tensor

    @classmethod
    def start(cls, x: Tensor) -> Best:
        b = len(x)
        return cls(x.detach().clone(), torch.full((b,), -1, dtype=torch.long, device=x.device),
                   torch.full((b,), -math.inf, device=x.device),
                   torch.full((b,), -1, dtype=torch.long, device=x.device))

    def offer(self, idx: Tensor, x: Tensor, tier: Tensor, progress: Tensor, run: int) -> None:
        """Keep x where it climbs a tier, or improves within a tier (right answers: only
        within the run that found them, whose stage-1 loss it compares)."""
        old_t, old_p, old_r = self.tier[idx], self.progress[idx], self.run[idx]
        same = (tier == old_t) & ((tier > 0) | (old_r == run)) & (progress > old_p)
        better = (tier > old_t) | same
        if better.any():
            sel = idx[better]
            self.x[sel] = x[better].detach()
            self.tier[sel] = tier[better]
            self.progress[sel] = progress[better].to(self.progress.dtype)
            self.run[sel] = run

    @property
    def done(self) -> Tensor:
        return self.tier >= 2


def apgd_checkpoints(iters: int) -> list[int]:
    """APGD's step-size checkpoints: first after 22% of the iterations, then every 3% fewer,
    never closer than 6%."""
    p, step = [], max(int(0.22 * iters), 1)
    dec, low = max(int(0.03 * iters), 1), max(int(0.06 * iters), 1)
    at = step
    while at <= iters:
        p.append(at)
        step = max(step - dec, low)
        at += step
    return p


def _uniform(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return project_linf(x + (2 * noise - 1) * eps, x, eps)


Evaluate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _evaluator(model: Classifier, y: Tensor, goal: Goal, loss: Loss,
               target: Tensor | None) -> Evaluate:
    """(idx, x) -> (gradient of the loss, tier, progress, loss) for the samples `idx`."""

    def run(idx: Tensor, xa: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            fw = surrogate_forward(model, xa, goal)
            value, tier, progress = objective(fw, y[idx], goal, loss,
                                              None if target is None else target[idx])
            (grad,) = torch.autograd.grad(value.sum(), xa)
        return grad.detach(), tier, progress, value.detach()

    return run


def apgd_run(model: Classifier, x: Tensor, y: Tensor, goal: Goal, best: Best, *, eps: float,
             iters: int, loss: Loss, target: Tensor | None, run: int,
             gen: torch.Generator) -> None:
    """One APGD search from a random start on the samples `best` has not finished; offers
    every iterate to `best`. Samples drop out of the batch once they reach the top tier."""
    idx = (~best.done).nonzero().flatten()
    if idx.numel() == 0:
        return
    evaluate = _evaluator(model, y, goal, loss, target)
    xs = x[idx]
    cur = _uniform(xs, eps, gen)
    grad, tier, prog, _ = evaluate(idx, cur)
    best.offer(idx, cur, tier, prog, run)
    b = len(idx)
    step = torch.full((b,), 2.0 * eps, device=x.device, dtype=x.dtype)
    prev = cur.clone()
    run_best_x, run_best_p, run_best_g = cur.clone(), prog.clone(), grad.clone()
    last_p = prog.clone()
    ups = torch.zeros(b, device=x.device)
    reduced_last = torch.zeros(b, dtype=torch.bool, device=x.device)
    best_at_check = run_best_p.clone()
    checks = set(apgd_checkpoints(iters))
    since = 0
    live = torch.ones(b, dtype=torch.bool, device=x.device)  # not yet at the top tier
    shape = (-1, *[1] * (x.dim() - 1))
    for i in range(iters):
        a = 1.0 if i == 0 else 0.75
        s = step.view(shape)
        z = project_linf(cur + s * grad.sign(), xs, eps)
        nxt = project_linf(cur + a * (z - cur) + (1 - a) * (cur - prev), xs, eps)
        prev, cur = cur, nxt
        on = live.nonzero().flatten()
        if on.numel():
            g, t, p, _ = evaluate(idx[on], cur[on])
            grad[on] = g
            ups[on] += (p > last_p[on]).float()
            last_p[on] = p
            best.offer(idx[on], cur[on], t, p, run)
            up = p > run_best_p[on]
            sel = on[up]
            run_best_x[sel], run_best_p[sel], run_best_g[sel] = cur[sel], p[up], g[up]
            live[on] = t < 2
        since += 1
        if i + 1 in checks:
            few = ups < 0.75 * since
            stuck = ~reduced_last & (run_best_p <= best_at_check)
            halve = few | stuck
            step = torch.where(halve, step / 2, step)
            cur = torch.where(halve.view(shape), run_best_x, cur)
            grad = torch.where(halve.view(shape), run_best_g, grad)
            reduced_last, best_at_check = halve, run_best_p.clone()
            ups.zero_()
            since = 0
        if not live.any():
            break


def top_wrong_classes(model: Classifier, x: Tensor, y: Tensor, k: int) -> Tensor:
    """[B, k] the k classes other than y with the largest clean logits (APGD-T's targets)."""
    with torch.no_grad():
        logits = model(x)
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.topk(k, dim=1).indices


def selective_attack(model: Classifier, x: Tensor, y: Tensor, goal: Goal, *, eps: float,
                     iters: int = 100, restarts: int = 1, targets: int = 3, loss: Loss = "ce",
                     seed: int = 0, best: Best | None = None) -> Best:
    """Per-sample best inputs for `goal` within the eps-ball of x: `restarts` untargeted APGD
    runs (`loss`), then one targeted DLR run per top wrong class (`targets` of them, capped at
    classes - 1), each on the samples not yet answered wrongly. `best` continues an earlier
    search (another coverage's, re-judged at this goal)."""
    best = best or Best.start(x)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    k = min(targets, int(model.config.num_classes) - 1)
    if k > 0 and int(model.config.num_classes) < 4:
        k = 0  # the targeted DLR needs the 3rd and 4th largest logits
    tops = top_wrong_classes(model, x, y, k) if k > 0 else None
    run = int(best.run.max().item()) + 1 if len(best.run) else 0
    for _ in range(restarts):
        apgd_run(model, x, y, goal, best, eps=eps, iters=iters, loss=loss, target=None,
                 run=run, gen=gen)
        run += 1
    for j in range(k):
        apgd_run(model, x, y, goal, best, eps=eps, iters=iters, loss="dlr",
                 target=tops[:, j], run=run, gen=gen)
        run += 1
    return best


def judge(model: Classifier, x: Tensor, y: Tensor, goal: Goal) -> tuple[Tensor, Tensor]:
    """(tier [B], progress [B]) of x under `goal` without a gradient step (re-judging a point
    found for another threshold)."""
    with torch.enable_grad():
        fw = surrogate_forward(model, x.detach().requires_grad_(True), goal)
        _, tier, progress = objective(fw, y, goal, "ce", None)
    return tier, progress.detach()
