"""White-box and adaptive attacks for evaluation, and the per-sample worst case over them.

A DEQ's robustness depends on which gradient the attacker uses, so every attack names its path:
`phantom` / `implicit` / `exact` (backprop through every solver iteration), the paper's
intermediate-state attacks (unroll K damped steps from solver iterate i, paper.md 3.3/5), BPDA
through the entropy-reduction defense, and an entropy-aware attack on the detector. Success is
always judged on the evaluated predictor (the deterministic forward, defended or not), never on
the surrogate that produced the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.models.classifier import Classifier, DEQClassifier
from deqguard.models.defense import EntropyReductionConfig, bpda_logits
from deqguard.models.entropy import prediction_entropy
from deqguard.training.attacks import pgd

AttackKind = Literal["pgd", "intermediate", "bpda", "detector"]
Predict = Callable[[Tensor], Tensor]  # x -> predicted labels [B]


@dataclass(frozen=True)
class AttackSpec:
    """One attack, fully described (it is written into the JSON next to its result).

    `gradient`: path for kind "pgd"/"detector"/"bpda" ("direct" for feedforward models).
    `state`/`unroll`/`tau`: the intermediate attack's i, K and damping (0.5 = the paper's "M",
    1.0 = "F"). `lam`: weight of the summed trajectory entropy in the detector attack.
    """

    name: str
    kind: AttackKind
    eps: float
    steps: int
    step_size: float
    gradient: str | None = None
    state: int | None = None
    unroll: int | None = None
    tau: float | None = None
    lam: float | None = None
    restarts: int = 1

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s 2.5 eps / steps: the walk can cross the ball even from its edge."""
    return 2.5 * eps / max(steps, 1)


def gradient_paths(model: Classifier) -> list[str]:
    return ["phantom", "implicit", "exact"] if model.is_deq else ["direct"]


def parse_grid(text: str) -> list[tuple[int, int]]:
    """'1:5,4:5' -> [(1, 5), (4, 5)]: (solver iterate i, unrolled steps K) pairs."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        i, k = item.split(":")
        out.append((int(i), int(k)))
    return out


# -- differentiable surrogates ---------------------------------------------------------------------

def path_logits(model: Classifier, x: Tensor, gradient: str) -> Tensor:
    """Logits whose value is the model's forward and whose gradient follows `gradient`."""
    if not model.is_deq or gradient == "direct":
        return model(x)
    return model(x, grad=gradient)


def intermediate_logits(model: DEQClassifier, x: Tensor, state: int, unroll: int,
                        tau: float) -> Tensor:
    """decode of K damped steps z <- (1-tau) z + tau f(z, inject(x)) from solver iterate z_i.

    z_i comes from the model's own solver without a graph (i = 0 is the initial state); the
    gradient flows through the K steps and the injection, as in the paper's [M|F]unroll-i-K.
    """
    with torch.no_grad():
        if state > 0:
            z = model.equilibrium(x, max_iter=state).z_star
        else:
            z = model.initial_state(model.inject(x))
    u = model.inject(x)
    z = z.detach()
    for _ in range(unroll):
        z = (1 - tau) * z + tau * model.layer(z, u)
    return model.decode(z)


def detector_loss(model: Classifier, x: Tensor, y: Tensor, lam: float) -> Tensor:
    """CE(logits, y) - lam * [fooled] * sum_t H(decode(z_t)): misclassify, then look settled.

    The entropy term switches on per sample once the input is misclassified: the attacker first
    crosses the boundary, then spends its steps lowering the trajectory entropy (a plain
    CE - lam * sum H with the sum over ~T iterates mostly buys low entropy and few errors).
    Gradient: exact backprop through every solver iteration (each iterate's entropy and the final
    logits). For a feedforward model the trajectory is the single output.
    """
    if not model.is_deq:
        logits = model(x)
        ent = prediction_entropy(logits)
    else:
        assert isinstance(model, DEQClassifier)
        eq = model.equilibrium(x, grad="exact", keep_states=True)
        states = eq.output.states or [eq.z]
        ent = torch.stack([prediction_entropy(model.decode(s)) for s in states]).sum(0)
        logits = model.decode(eq.z)
    fooled = (logits.argmax(1) != y).to(ent.dtype).detach()
    return F.cross_entropy(logits, y, reduction="none") - lam * fooled * ent


def loss_fn_for(model: Classifier, spec: AttackSpec, y: Tensor,
                defense: EntropyReductionConfig | None) -> Callable[[Tensor], Tensor]:
    if spec.kind == "pgd":
        return lambda xa: F.cross_entropy(path_logits(model, xa, spec.gradient or "phantom"), y,
                                          reduction="none")
    if spec.kind == "intermediate":
        assert isinstance(model, DEQClassifier)
        return lambda xa: F.cross_entropy(
            intermediate_logits(model, xa, spec.state or 0, spec.unroll or 1, spec.tau or 0.5),
            y, reduction="none")
    if spec.kind == "bpda":
        return lambda xa: F.cross_entropy(
            bpda_logits(model, xa, defense, grad=spec.gradient), y, reduction="none")
    if spec.kind == "detector":
        return lambda xa: detector_loss(model, xa, y, spec.lam or 0.0)
    raise ValueError(f"unknown attack kind {spec.kind!r}")


# -- running ---------------------------------------------------------------------------------------

def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def run_attack(model: Classifier, spec: AttackSpec, x: Tensor, y: Tensor, predict: Predict, *,
               defense: EntropyReductionConfig | None = None, batch_size: int = 128,
               generator: torch.Generator | None = None,
               on_batch: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
    """(x_adv, correct) over all samples: PGD with `spec.restarts` random starts.

    Per sample the first restart that fools `predict` is kept; `correct` is judged by `predict`.
    """
    advs, oks = [], []
    for sl in batches(len(x), batch_size):
        xb, yb = x[sl], y[sl]
        best = xb.clone()
        ok = torch.ones(len(xb), dtype=torch.bool, device=x.device)
        for _ in range(spec.restarts):
            todo = ok.nonzero().flatten()
            if todo.numel() == 0:
                break
            xs, ys = xb[todo], yb[todo]
            x_adv = pgd(loss_fn_for(model, spec, ys, defense), xs, eps=spec.eps,
                        step_size=spec.step_size, steps=spec.steps, start="uniform",
                        generator=generator)
            with torch.no_grad():
                still = predict(x_adv) == ys
            best[todo] = x_adv
            ok[todo] = still
        advs.append(best)
        oks.append(ok)
        if on_batch is not None:
            on_batch()
    return torch.cat(advs), torch.cat(oks)


def worst_case(correct: dict[str, Tensor]) -> Tensor:
    """Per-sample robustness: a sample counts only if every attack left it correct.

    This is not the minimum of the per-attack accuracies: two attacks that each fool a
    different half of the samples give 0 here, 50% as a minimum.
    """
    if not correct:
        raise ValueError("no attacks to combine")
    flags = torch.stack([c.bool() for c in correct.values()])
    return flags.all(dim=0)
