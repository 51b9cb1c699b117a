"""Training objectives: standard CE, PGD-AT (Madry), TRADES and the single-step FGSM-RS and
N-FGSM, with the paper's regulation.

Every model call made while computing a loss (the clean forward, the adversarial forward, and
each forward inside the inner attack) goes through one `TrainForward`. With the regulation on
(paper Sec 3.3) it draws n ~ Uniform{1..max_iter} solver iterations anew for every call and
reads the logits through the phantom tail f(z_n) + damped steps (`readout="unrolled"`), so the
loss sees random intermediate states of the dynamics instead of the (approximate) fixed point.

Inner attacks run with the model in eval mode (dropout off, the same random-depth forward) and
the model is put back in train mode for the update, as the paper's code does.

A model with a rectifier head (models/rectifier.py) can add Pang et al.'s rectified-rejection
term to the CE objectives: BCE(max p x sigmoid(A), stopgrad p_y) on the adversarial batch, with
A read at the state of that batch's forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.classifier import Classifier, SolveResult
from ..models.config import GradConfig
from ..models.rectifier import rectified_loss
from .attacks import fgsm_rs, n_fgsm, pgd, pgd_ce
from .config import SINGLE_STEP_KINDS, ObjectiveConfig
from .graphs import DepthGraphs


@dataclass
class TrainForward:
    """The forward used by losses and inner attacks: fixed or random solver depth.

    `depths` and `iterations` record, per call, the drawn budget and the mean number of solver
    steps taken (training logs and tests read them); the means stay on the device (a 0-dim
    tensor each) until the caller reads them, so that recording them is not a host sync.
    `sync_free` solves without reading the device back at all (models/solvers/base.py): the
    same numbers, for a GPU. `graphs` replays captured forwards (training/graphs.py) where a
    call needs only the logits; they solve sync-free too.
    """

    model: Classifier
    solver: str | None = None
    max_iter: int | None = None
    tol: float | None = None
    grad: GradConfig | None = None
    readout: str = "unrolled"
    random_depth: bool = False
    generator: torch.Generator | None = None
    sync_free: bool = False
    graphs: DepthGraphs | None = None
    depths: list[int] = field(default_factory=list)
    iterations: list[Tensor] = field(default_factory=list)
    # graphs replayed for the update (train mode), whose backward comes at the step's end
    replayed: set[tuple] = field(default_factory=set)

    def draw_depth(self) -> int | None:
        """n ~ Uniform{1..max_iter} when regulated, else the fixed training budget."""
        if not self.random_depth:
            return self.max_iter
        if self.max_iter is None:
            raise ValueError("the regulation needs a solver budget (max_iter)")
        return int(torch.randint(1, self.max_iter + 1, (1,), generator=self.generator))

    def logits(self, x: Tensor, *, jacobian_vectors: int = 0,
               noise: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits of one forward and, if asked, the Hutchinson ||J_f||_F^2 at its state."""
        logits, jac, _ = self.outputs(x, jacobian_vectors=jacobian_vectors, noise=noise)
        return logits, jac

    def outputs(self, x: Tensor, *, jacobian_vectors: int = 0,
                noise: torch.Generator | None = None, rectifier: bool = False
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(logits, Jacobian term or None, the rectifier's A [B] if asked, else None).

        A is read at the state the logits are decoded from (the same gradient path), with the
        trajectory of this forward's own solve when the head reads one.
        """
        if not self.model.is_deq:
            if rectifier:
                raise ValueError("the rectifier head needs an equilibrium model")
            return self.model(x), None, None
        head = getattr(self.model, "rectifier", None) if rectifier else None
        if rectifier and head is None:
            raise ValueError("rectifier.weight > 0 needs a model with a rectifier head "
                             "(model.overrides.rectifier)")
        path = head is not None and head.config.trajectory > 0
        n = self.draw_depth()
        if (self.graphs is not None and n is not None and jacobian_vectors == 0 and head is None
                and torch.is_grad_enabled()):
            # eval mode is the inner attack's, each forward differentiated before the next
            replayed = self.graphs(x, n, solver=self.solver, tol=self.tol, grad=self.grad,
                                   readout=self.readout,
                                   once=self.replayed if self.model.training else None)
            if replayed is not None:
                self.depths.append(n)
                self.iterations.append(replayed[1])
                return replayed[0], None, None
        eq = self.model.equilibrium(x, solver=self.solver, max_iter=n, tol=self.tol,
                                    grad=self.grad, readout=self.readout, trajectory=path,
                                    sync_free=self.sync_free or self.graphs is not None)
        if n is not None:
            self.depths.append(n)
        self.iterations.append(eq.output.iterations.float().mean())
        jac = (jacobian_frobenius(eq.f, eq.z_star, jacobian_vectors, noise)
               if jacobian_vectors > 0 and torch.is_grad_enabled() else None)
        logits = self.model.decode(eq.z)
        a = None
        if head is not None:
            out = eq.output
            solved = SolveResult(logits=logits, residual=out.residual,
                                 iterations=out.iterations, converged=out.converged,
                                 entropy=eq.entropy)
            a = self.model.rectifier_logit(eq.z, solved)
        return logits, jac, a

    def __call__(self, x: Tensor) -> Tensor:
        return self.logits(x)[0]


def jacobian_frobenius(f, z_star: Tensor, vectors: int,
                       generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson estimate of ||J_f(z*)||_F^2 per state element (Bai et al. 2021).

    E_v ||v^T J||^2 = ||J||_F^2 for v ~ N(0, I); averaged over `vectors` draws and divided by the
    number of elements, as in the DEQ reference code, so the weight does not depend on size.
    """
    z = z_star.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = f(z)
        total = fz.new_zeros(())
        for _ in range(vectors):
            v = torch.randn(fz.shape, generator=generator, device=fz.device, dtype=fz.dtype)
            (vj,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True)
            total = total + vj.float().pow(2).sum()
    return total / vectors / z.numel()


@contextmanager
def eval_mode(model: Classifier) -> Iterator[None]:
    """Attack with dropout off; restore the previous mode for the update."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class LossOutput:
    """A training loss and what the log reports about it."""

    loss: Tensor
    clean_logits: Tensor | None = None
    adv_logits: Tensor | None = None
    jacobian: Tensor | None = None
    x_adv: Tensor | None = None
    rectifier: Tensor | None = None  # the rectified-rejection BCE, detached, when trained


def _with_jacobian(loss: Tensor, terms: list[Tensor | None], weight: float
                   ) -> tuple[Tensor, Tensor | None]:
    present = [t for t in terms if t is not None]
    if not present or weight <= 0:
        return loss, None
    jac = torch.stack(present).sum()
    return loss + weight * jac, jac.detach()


def standard_loss(fwd: TrainForward, x: Tensor, y: Tensor, *, jacobian_vectors: int = 0,
                  jacobian_weight: float = 0.0, noise: torch.Generator | None = None
                  ) -> LossOutput:
    logits, jac = fwd.logits(x, jacobian_vectors=jacobian_vectors, noise=noise)
    loss, jac = _with_jacobian(F.cross_entropy(logits, y), [jac], jacobian_weight)
    return LossOutput(loss=loss, clean_logits=logits.detach(), jacobian=jac)


def adversarial_ce_loss(fwd: TrainForward, x: Tensor, y: Tensor, x_adv: Tensor, *,
                        clean_weight: float = 0.0, noise: torch.Generator | None = None,
                        jacobian_vectors: int = 0, jacobian_weight: float = 0.0,
                        rectifier_weight: float = 0.0) -> LossOutput:
    """CE on x_adv, mixed with CE on x when `clean_weight` > 0 (half-clean batches as in the
    published PGD-AT Fashion-MNIST models: a lever for clean accuracy); plus
    `rectifier_weight` x the rectified-rejection BCE on x_adv (Pang et al. train it on the
    adversarial batch: that is where the confidence must learn to drop)."""
    logits, jac, a = fwd.outputs(x_adv, jacobian_vectors=jacobian_vectors, noise=noise,
                                 rectifier=rectifier_weight > 0)
    loss = F.cross_entropy(logits, y)
    bce = None
    if a is not None:
        bce = rectified_loss(logits, a, y)
        loss = loss + rectifier_weight * bce
    jacs = [jac]
    clean_logits = None
    if clean_weight > 0:
        clean_logits, jac_nat = fwd.logits(x, jacobian_vectors=jacobian_vectors, noise=noise)
        loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(clean_logits, y)
        jacs.append(jac_nat)
        clean_logits = clean_logits.detach()
    loss, jac = _with_jacobian(loss, jacs, jacobian_weight)
    return LossOutput(loss=loss, clean_logits=clean_logits, adv_logits=logits.detach(),
                      jacobian=jac, x_adv=x_adv,
                      rectifier=None if bce is None else bce.detach())


def pgd_at_loss(fwd: TrainForward, x: Tensor, y: Tensor, *, eps: float, step_size: float,
                steps: int, noise: torch.Generator | None = None, clean_weight: float = 0.0,
                jacobian_vectors: int = 0, jacobian_weight: float = 0.0,
                rectifier_weight: float = 0.0) -> LossOutput:
    """Madry et al.: CE on PGD examples (uniform start)."""
    with eval_mode(fwd.model):
        x_adv = pgd_ce(fwd, x, y, eps=eps, step_size=step_size, steps=steps, generator=noise)
    return adversarial_ce_loss(fwd, x, y, x_adv, clean_weight=clean_weight, noise=noise,
                               jacobian_vectors=jacobian_vectors, jacobian_weight=jacobian_weight,
                               rectifier_weight=rectifier_weight)


def single_step_loss(cfg: ObjectiveConfig, fwd: TrainForward, x: Tensor, y: Tensor, *,
                     noise: torch.Generator | None = None, jacobian_vectors: int = 0,
                     jacobian_weight: float = 0.0, rectifier_weight: float = 0.0) -> LossOutput:
    """FGSM-RS or N-FGSM examples, then the same CE as PGD-AT: one attack gradient per step.

    With the regulation on, the attack's forward draws its own random depth, like each PGD step.
    """
    with eval_mode(fwd.model):
        if cfg.kind == "fgsm-rs":
            x_adv = fgsm_rs(fwd, x, y, eps=cfg.eps, step_size=cfg.step_size, generator=noise)
        else:
            x_adv = n_fgsm(fwd, x, y, eps=cfg.eps, step_size=cfg.step_size, noise=cfg.noise,
                           generator=noise)
    return adversarial_ce_loss(fwd, x, y, x_adv, clean_weight=cfg.clean_weight, noise=noise,
                               jacobian_vectors=jacobian_vectors, jacobian_weight=jacobian_weight,
                               rectifier_weight=rectifier_weight)


def trades_attack(fwd: TrainForward, x: Tensor, *, eps: float, step_size: float, steps: int,
                  noise: torch.Generator | None = None) -> Tensor:
    """TRADES' inner maximisation of KL(p(x) || p(x_adv)) from x + 0.001 N(0, 1).

    The clean prediction is recomputed at every step, as in the paper's code: with the
    regulation on, each of those forwards draws its own depth.
    """

    def kl(x_adv: Tensor) -> Tensor:
        log_p_adv = F.log_softmax(fwd(x_adv).float(), dim=1)
        with torch.no_grad():
            p_nat = F.softmax(fwd(x).float(), dim=1)
        return F.kl_div(log_p_adv, p_nat, reduction="none").sum(dim=1)

    return pgd(kl, x, eps=eps, step_size=step_size, steps=steps, start="normal", generator=noise)


def trades_loss(fwd: TrainForward, x: Tensor, y: Tensor, *, eps: float, step_size: float,
                steps: int, beta: float, noise: torch.Generator | None = None,
                jacobian_vectors: int = 0, jacobian_weight: float = 0.0) -> LossOutput:
    """Zhang et al.: CE(clean) + beta * KL(p(x) || p(x_adv)), batch mean (paper: beta 6)."""
    with eval_mode(fwd.model):
        x_adv = trades_attack(fwd, x, eps=eps, step_size=step_size, steps=steps, noise=noise)
    logits_nat, jac_nat = fwd.logits(x, jacobian_vectors=jacobian_vectors, noise=noise)
    logits_adv, jac_adv = fwd.logits(x_adv, jacobian_vectors=jacobian_vectors, noise=noise)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1),
                      F.softmax(logits_nat.float(), dim=1), reduction="batchmean")
    loss = F.cross_entropy(logits_nat, y) + beta * robust
    loss, jac = _with_jacobian(loss, [jac_nat, jac_adv], jacobian_weight)
    return LossOutput(loss=loss, clean_logits=logits_nat.detach(), adv_logits=logits_adv.detach(),
                      jacobian=jac, x_adv=x_adv)


def objective_loss(cfg: ObjectiveConfig, fwd: TrainForward, x: Tensor, y: Tensor, *,
                   noise: torch.Generator | None = None, clean_only: bool = False,
                   jacobian_vectors: int = 0, jacobian_weight: float = 0.0,
                   rectifier_weight: float = 0.0) -> LossOutput:
    """The configured objective's loss on one batch (`clean_only` for the clean warm-up);
    `rectifier_weight` applies to the CE objectives on an adversarial batch only."""
    jac = {"jacobian_vectors": jacobian_vectors, "jacobian_weight": jacobian_weight,
           "noise": noise}
    if cfg.kind == "standard" or clean_only:
        return standard_loss(fwd, x, y, **jac)
    if cfg.kind == "pgd-at":
        return pgd_at_loss(fwd, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                           clean_weight=cfg.clean_weight, rectifier_weight=rectifier_weight,
                           **jac)
    if cfg.kind in SINGLE_STEP_KINDS:
        return single_step_loss(cfg, fwd, x, y, rectifier_weight=rectifier_weight, **jac)
    if cfg.kind == "trades":
        return trades_loss(fwd, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                           beta=cfg.beta, **jac)
    raise ValueError(f"unknown objective {cfg.kind!r}")
