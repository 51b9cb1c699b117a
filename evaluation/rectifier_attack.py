"""The adaptive attack on the rectifier head: a wrong answer whose rectified confidence stays high.

Pang et al.'s own adaptive attack (CVPR 2022, their eval code): PGD maximises
CE(logits, y) + lam x BCE(R, stopgrad p_y), R = max p x sigmoid(A). The CE term makes the answer
wrong; once it is, p_y is small and the BCE term grows as R rises, so the head is pushed to trust
the wrong answer. The gradient is exact: backprop through every solver iteration and through
the head at the state and, for a head that reads the solver's path, through its entropy and
residual features too (`DEQClassifier.graph_trajectory_features`: the recorded values, computed
again from the kept iterates with their graph). Success is judged on the served score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.models.classifier import DEQClassifier
from deqguard.models.rectifier import rectified_bce
from deqguard.training.attacks import pgd, project_linf

from .attacks import default_step_size


def rectifier_logits(model: DEQClassifier, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits [B, K], the head's A [B]) with a graph back to x through every solver step and
    every feature the head reads."""
    if model.rectifier is None:
        raise ValueError("the rectifier-aware attack needs a model with a rectifier head")
    length = model.rectifier.config.trajectory
    eq = model.equilibrium(x, grad="exact", keep_states=length > 0)
    logits = model.decode(eq.z)
    feats = model.graph_trajectory_features(eq, length) if length else None
    return logits, model.rectifier(eq.z, feats)


def rectifier_objective(model: DEQClassifier, x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Per-sample CE + lam x BCE(R, stopgrad p_y) [B], the quantity the attack raises."""
    logits, a = rectifier_logits(model, x)
    return F.cross_entropy(logits.float(), y, reduction="none") + lam * rectified_bce(logits, a, y)


def rectifier_aware_pgd(model: DEQClassifier, x: Tensor, y: Tensor, *, eps: float, lam: float,
                        steps: int = 10, seed: int = 0) -> Tensor:
    """x_adv within the L-inf eps-ball (and [0, 1]) maximising `rectifier_objective`, from a
    uniform random start; the issue's lambdas are 0.5, 1 and 2."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return pgd(lambda xa: rectifier_objective(model, xa, y, lam), x, eps=eps,
               step_size=default_step_size(eps, steps), steps=steps, start="uniform",
               generator=gen)


def targeted_rectified_objective(model: DEQClassifier, x: Tensor, target: Tensor) -> Tensor:
    """log p_t + log sigmoid(A) [B]: the log rectified confidence the served answer would carry
    if it were t (R = max p x sigmoid(A), and max p = p_t once t is the answer)."""
    logits, a = rectifier_logits(model, x)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(1, target[:, None]).squeeze(1) + F.logsigmoid(a.float())


def multi_targeted_pgd(model: DEQClassifier, x: Tensor, targets: Tensor, *, eps: float,
                       steps: int = 10, seed: int = 0) -> list[Tensor]:
    """One PGD per column of `targets` [B, K] (the top wrong classes of the clean answer), each
    raising `targeted_rectified_objective` towards its class: a wrong answer the head trusts.
    Returns the K attacked sets, each inside the L-inf eps-ball and [0, 1]."""
    out = []
    for j in range(targets.shape[1]):
        gen = torch.Generator(device=x.device).manual_seed(seed + 1009 * j)
        t = targets[:, j]
        out.append(pgd(lambda xa, t=t: targeted_rectified_objective(model, xa, t), x, eps=eps,
                       step_size=default_step_size(eps, steps), steps=steps, start="uniform",
                       generator=gen))
    return out


def served_confidence(model: DEQClassifier, x: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """(log of the served confidence 1 - doubt [B], differentiable; logits [B, K]) for the
    doubt scores `rectified` (R = max p x sigmoid(A)) and `max_softmax` (max p)."""
    if score == "rectified":
        logits, a = rectifier_logits(model, x)
        log_conf = torch.log_softmax(logits.float(), dim=-1).max(dim=-1).values
        return log_conf + F.logsigmoid(a.float()), logits
    if score == "max_softmax":
        logits = model.decode(model.equilibrium(x, grad="exact").z)
        return torch.log_softmax(logits.float(), dim=-1).max(dim=-1).values, logits
    raise ValueError(f"no doubt-raising attack for the score {score!r}")


def doubt_raising_pgd(model: DEQClassifier, x: Tensor, label: Tensor, score: str, *,
                      eps: float, steps: int = 10, seed: int = 0) -> Tensor:
    """Per sample the input within the L-inf eps-ball (and [0, 1]) with the highest doubt of
    `score` among the PGD iterates whose answer stays `label`, x itself where none does.

    The over-rejection attack: it lowers the served confidence without changing the answer, so
    any abstention it causes costs a caller a right (or at least unchanged) answer. A score
    that abstains more under attack only because small nudges push clean inputs over its
    threshold is paying for its gains with answers.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x = x.detach()
    best = x.clone()
    best_doubt = torch.full((len(x),), -float("inf"), device=x.device)
    step = default_step_size(eps, steps)
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    cur = project_linf(x + (2 * noise - 1) * eps, x, eps)
    for i in range(steps + 1):
        for xa in ((x, cur) if i == 0 else (cur,)):
            xa = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                log_conf, logits = served_confidence(model, xa, score)
                (grad,) = torch.autograd.grad((-log_conf).sum(), xa)
            doubt = 1.0 - log_conf.detach().exp()
            keep = (logits.argmax(1) == label) & (doubt > best_doubt)
            best[keep] = xa.detach()[keep]
            best_doubt[keep] = doubt[keep]
        if i < steps:
            cur = project_linf(cur + step * grad.sign(), x, eps).detach()
    return best
