"""Per-sample features of a DEQ's dynamics, the inputs of the learned attack detector.

The promise behind detection is that an adversarial input leaves a trace in the dynamics, not
only in the final prediction: a less stable fixed point, a basin that a small kick leaves, a
prediction that changes along the iterates, entropy that reacts differently to the paper's
entropy-reduction step. Each feature is one number per sample; their cost is stated in f
evaluations (one f evaluation = one solver iteration; a vector-Jacobian product costs about two):

| feature | cost | meaning |
|---|---|---|
| final_entropy, max_softmax, logit_margin | free | baselines: entropy, 1 - max p, top-2 gap |
| mean_entropy, early_entropy, entropy_drop | free | entropy: mean, at `early_index`, early-final |
| early_disagree | free | 1 if the prediction at `early_index` differs from the final one |
| iterations, converged | free | the solver's own statistics |
| log_residual | 1 (0 beside the Jacobian) | log10 ||f(z*) - z*|| / ||f(z*)|| at the state z* |
| jacobian_rms | 2 x jacobian_vjps | Hutchinson ||J_f(z*)||_F / sqrt(d) (Bai et al. 2021) |
| spectral_radius | 2 x power_iters | power iteration on J_f(z*)^T (0 iterations: feature absent) |
| restart_shift, restart_flip, restart_entropy | restart_iters | re-solve from z* + a kick |
| entropy_step_drop | ~4 | entropy drop after one Sec 3.2 signed input step |

`log_residual` and the Jacobian share one f evaluation with a graph at z*; with all of them off
(a trajectory-only detector) the features cost no f evaluation at all. Everything random (the
Hutchinson probes, the kick) is one fixed pattern drawn from `seed` and shared by every sample,
so a sample's features depend neither on its batch mates nor on the call: the served flag and
the in-process one agree, and an attacker can know the pattern (no security through noise).

With `differentiable=True` the features keep a graph back to x (for the detector-aware attack):
`result` must then come from an exact-gradient solve with `keep_states=True`; the counting
features (iterations, converged, early_disagree, restart_flip) stay constants.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .entropy import mean_over_own_iterates, prediction_entropy
from .solvers.base import residual

# classifier.py imports this module (model.solve(features=...)): no import back, so the
# model and its solve result are typed loosely here.
DEQClassifier = Any  # a models.classifier.DEQClassifier
SolveResult = Any  # a models.classifier.SolveResult

BASELINE_FEATURES: tuple[str, ...] = ("final_entropy", "max_softmax", "logit_margin")
TRAJECTORY_FEATURES: tuple[str, ...] = ("mean_entropy", "early_entropy", "entropy_drop",
                                        "early_disagree", "iterations", "converged")
FEATURE_NAMES: tuple[str, ...] = (
    *BASELINE_FEATURES, *TRAJECTORY_FEATURES, "log_residual", "jacobian_rms",
    "spectral_radius", "restart_shift", "restart_flip", "restart_entropy", "entropy_step_drop")
# Counting features: constants for the differentiable surrogate.
DISCRETE_FEATURES: frozenset[str] = frozenset(
    {"iterations", "converged", "early_disagree", "restart_flip"})


class DynamicsConfig(BaseModel):
    """What the features cost and probe; stored with a detector so serving recomputes them alike.

    `early_index`: 0-based iterate for the early-vs-final comparisons. `jacobian_vjps`:
    Hutchinson probes. `power_iters`: power iterations for the spectral radius (0 = skip).
    `restart_iters` / `restart_kick`: the perturbed re-solve, from z* + kick * rms(z*) * noise.
    `entropy_step`: size of the one signed input step of the entropy-reduction feature.
    `log_residual`: whether to compute it (False and no Jacobian feature: no f evaluation at z*).
    A switched-off feature changes no other: each draws its own fixed pattern.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    early_index: int = Field(2, ge=0, le=1000)
    jacobian_vjps: int = Field(1, ge=0, le=64)
    power_iters: int = Field(0, ge=0, le=64)
    restart_iters: int = Field(8, ge=0, le=1000)
    restart_kick: float = Field(0.5, ge=0)
    entropy_step: float = Field(0.025, ge=0)
    log_residual: bool = True
    seed: int = 0

    def names(self) -> list[str]:
        """The features this configuration computes, in FEATURE_NAMES order."""
        skip = set()
        if not self.log_residual:
            skip.add("log_residual")
        if self.jacobian_vjps == 0:
            skip.add("jacobian_rms")
        if self.power_iters == 0:
            skip.add("spectral_radius")
        if self.restart_iters == 0:
            skip |= {"restart_shift", "restart_flip", "restart_entropy"}
        if self.entropy_step == 0:
            skip.add("entropy_step_drop")
        return [n for n in FEATURE_NAMES if n not in skip]

    def extra_f_evals(self) -> float:
        """Approximate cost beyond the plain solve, in f evaluations (module table)."""
        cost = 1 if self.probes_z_star() else 0
        cost += 2 * self.jacobian_vjps + 2 * self.power_iters
        cost += self.restart_iters + (4 if self.entropy_step > 0 else 0)
        return float(cost)

    def probes_z_star(self) -> bool:
        """Whether any feature needs the f evaluation with a graph at z* (residual, Jacobian)."""
        return self.log_residual or self.jacobian_vjps > 0 or self.power_iters > 0


def _pattern(shape: torch.Size, seed: int, salt: int, like: Tensor) -> Tensor:
    """A fixed standard-normal pattern [1, *shape[1:]], the same for every sample and call."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + salt)
    return torch.randn((1, *shape[1:]), generator=gen).to(device=like.device, dtype=like.dtype)


def _norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _margin(logits: Tensor) -> Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def jacobian_features(f, z_star: Tensor, cfg: DynamicsConfig, *, create_graph: bool
                      ) -> dict[str, Tensor]:
    """log_residual, Hutchinson ||J||_F / sqrt(d) and power-iteration |lambda_max| at z*.

    E_v ||J^T v||^2 = ||J||_F^2 for v ~ N(0, I); dividing by d gives the mean squared singular
    value, so 1.0 is the contraction boundary in the RMS sense. Power iteration on J^T with VJPs
    converges to the eigenvalue of largest modulus (shared by J and J^T) when it is unique.
    """
    z = z_star if create_graph else z_star.detach().requires_grad_(True)
    fz = f(z)
    out = {"log_residual": torch.log10(residual(fz, z, "rel").clamp_min(1e-8))}
    d = z[0].numel()
    if cfg.jacobian_vjps:
        acc = torch.zeros(z.shape[0], device=z.device, dtype=fz.dtype)
        for k in range(cfg.jacobian_vjps):
            v = _pattern(fz.shape, cfg.seed, 1 + k, fz).expand_as(fz)
            (jt_v,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
            acc = acc + _norm(jt_v) ** 2
        out["jacobian_rms"] = torch.sqrt(acc / (cfg.jacobian_vjps * d) + 1e-12)
    if cfg.power_iters:
        v = _pattern(fz.shape, cfg.seed, 101, fz).expand_as(fz)
        v = v / _norm(v).view(-1, *[1] * (v.dim() - 1))
        lam = torch.zeros(z.shape[0], device=z.device, dtype=fz.dtype)
        for k in range(cfg.power_iters):
            last = k == cfg.power_iters - 1
            (w,) = torch.autograd.grad(fz, z, v, retain_graph=True,
                                       create_graph=create_graph and last)
            lam = _norm(w)
            v = (w / (lam.view(-1, *[1] * (w.dim() - 1)) + 1e-12))
            if not last:
                v = v.detach()
        out["spectral_radius"] = lam
    return out


def _entropy_step_drop(model: DEQClassifier, x: Tensor, z_star: Tensor, step: float, *,
                       create_graph: bool) -> Tensor:
    """H(decode(f(z*, inject(x)))) - H(decode(f(z*, inject(x')))), x' one Sec 3.2 step away.

    x' = clip(x - step * sign(grad_x H)) with z* held fixed, as in the paper's input update; the
    sign is a constant for the differentiable version.
    """
    # the direction holds z* fixed (paper.md 3.1), also for the attacker's surrogate
    xd = x.detach().requires_grad_(True)
    layer = model.layer
    if not create_graph:
        # Only x's gradient is asked for: the layer bound to its weights once, without a
        # graph to them (the same numbers as the module calls, with one weight-norm
        # computation instead of one per call and no graph to the weights).
        with torch.no_grad():
            layer = model.layer_fn()
    with torch.enable_grad():
        hd = prediction_entropy(model.decode(layer(z_star.detach(), model.inject(xd))))
        (g,) = torch.autograd.grad(hd.sum(), xd)
    if create_graph:
        h0 = prediction_entropy(model.decode(model.layer(z_star, model.inject(x))))
        z = z_star
        x1 = (x - step * g.sign()).clamp(0.0, 1.0)
        h1 = prediction_entropy(model.decode(model.layer(z, model.inject(x1))))
        return h0 - h1
    h0 = hd.detach()
    with torch.no_grad():
        x1 = (x.detach() - step * g.sign()).clamp(0.0, 1.0)
        h1 = prediction_entropy(model.decode(layer(z_star.detach(), model.inject(x1))))
    return h0 - h1


def _restart(model: DEQClassifier, x: Tensor, z_star: Tensor, logits: Tensor,
             cfg: DynamicsConfig, solver: str | None, tol: float | None, *,
             create_graph: bool) -> dict[str, Tensor]:
    """Re-solve `restart_iters` steps from z* + kick * rms(z*) * pattern and compare."""
    z_ref = z_star if create_graph else z_star.detach()
    rms = (_norm(z_ref) / z_ref[0].numel() ** 0.5).detach()
    kick = _pattern(z_ref.shape, cfg.seed, 211, z_ref) * cfg.restart_kick
    z0 = z_ref + kick * rms.view(-1, *[1] * (z_ref.dim() - 1))
    grad = "exact" if create_graph else None
    ctx = torch.enable_grad() if create_graph else torch.no_grad()
    with ctx:
        eq = model.equilibrium(x, solver=solver, max_iter=cfg.restart_iters, tol=tol, z0=z0,
                               grad=grad)
        z_r = eq.z if create_graph else eq.z_star
        logits_r = model.decode(z_r)
    return {
        "restart_shift": _norm(z_r - z_ref) / (_norm(z_ref) + 1e-9),
        "restart_flip": (logits_r.argmax(-1) != logits.argmax(-1)).to(logits.dtype).detach(),
        "restart_entropy": prediction_entropy(logits_r) - prediction_entropy(logits),
    }


def trajectory_features(result: SolveResult, cfg: DynamicsConfig, *,
                        entropy: Tensor | None = None, predictions: Tensor | None = None
                        ) -> dict[str, Tensor]:
    """The free features: baselines and trajectory statistics (rows past a sample's own
    iteration count repeat its last value, as the solvers pad them)."""
    logits = result.logits
    ent = result.entropy if entropy is None else entropy
    preds = result.predictions if predictions is None else predictions
    final_h = prediction_entropy(logits)
    if ent is None or ent.numel() == 0:
        ent = final_h.unsqueeze(0)
    if preds is None or preds.numel() == 0:
        preds = logits.argmax(-1).unsqueeze(0)
    k = min(cfg.early_index, ent.shape[0] - 1)
    early_h = ent[k]
    return {
        "final_entropy": final_h,
        "max_softmax": 1.0 - torch.softmax(logits, dim=-1).max(dim=-1).values,
        "logit_margin": _margin(logits),
        "mean_entropy": mean_over_own_iterates(ent, result.iterations),
        "early_entropy": early_h,
        "entropy_drop": early_h - final_h,
        "early_disagree": (preds[min(cfg.early_index, preds.shape[0] - 1)]
                           != logits.argmax(-1)).to(logits.dtype).detach(),
        "iterations": result.iterations.to(logits.dtype).detach(),
        "converged": result.converged.to(logits.dtype).detach(),
    }


def dynamics_features(model: DEQClassifier, x: Tensor, result: SolveResult,
                      cfg: DynamicsConfig | None = None, *, solver: str | None = None,
                      tol: float | None = None, differentiable: bool = False
                      ) -> dict[str, Tensor]:
    """{name: [B]} for every feature `cfg.names()` lists (module table for costs).

    `result` is the sample's solve (`model.solve`); with `differentiable=True` it must carry
    `states` with a graph (exact solve, keep_states) and `z`/`logits` with a graph too.
    """
    cfg = cfg or DynamicsConfig()
    if not getattr(model, "is_deq", False):
        raise ValueError("dynamics features need a DEQ model (a fixed point to probe)")
    names = cfg.names()
    if result.z is None:
        raise ValueError("dynamics features need the solve's state z (model.solve sets it)")
    if differentiable:
        return _graph_features(model, x, result, cfg, solver, tol)
    # The free features only read the solve's tensors: computed in the caller's mode, no copy.
    feats = trajectory_features(result, cfg)
    with torch.inference_mode(False), torch.enable_grad():
        # solves served under inference_mode hand over inference tensors; the probes build a
        # graph from x and z*, so those two are cloned out (the logits are only read)
        xc = x.detach().clone()
        zc = result.z.detach().clone()
        feats.update(_probes(model, xc, zc, result.logits.detach(), cfg, solver, tol,
                             create_graph=False))
    return {n: feats[n].detach() for n in names}


def _graph_features(model: DEQClassifier, x: Tensor, result: SolveResult, cfg: DynamicsConfig,
                    solver: str | None, tol: float | None) -> dict[str, Tensor]:
    """Every feature with a graph back to x: the trajectory re-decoded from the kept states."""
    if not result.states:
        raise ValueError("differentiable features need the solve's states (keep_states)")
    decoded = [model.decode(s) for s in result.states]
    entropy = torch.stack([prediction_entropy(d) for d in decoded])
    predictions = torch.stack([d.argmax(-1) for d in decoded])
    feats = trajectory_features(result, cfg, entropy=entropy, predictions=predictions)
    feats.update(_probes(model, x, result.z, result.logits, cfg, solver, tol,
                         create_graph=True))
    return feats


def _probes(model: DEQClassifier, x: Tensor, z_star: Tensor, logits: Tensor,
            cfg: DynamicsConfig, solver: str | None, tol: float | None, *,
            create_graph: bool) -> dict[str, Tensor]:
    """The features that cost f evaluations: the Jacobian at z*, the restart, the entropy step."""
    feats: dict[str, Tensor] = {}
    if cfg.probes_z_star():
        u = model.inject(x)

        def f(z: Tensor) -> Tensor:
            return model.layer(z, u)

        feats.update(jacobian_features(f, z_star, cfg, create_graph=create_graph))
    if cfg.restart_iters:
        feats.update(_restart(model, x, z_star, logits, cfg, solver, tol,
                              create_graph=create_graph))
    if cfg.entropy_step:
        feats["entropy_step_drop"] = _entropy_step_drop(model, x, z_star, cfg.entropy_step,
                                                        create_graph=create_graph)
    return feats
