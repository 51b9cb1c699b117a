"""One served sample's solve, the form an answer is built from, from the solve to the JSON.

A batch `SolveResult` is split right after the solve into per-sample traces, each cut to the
sample's own iteration count: the solver pads a batch's trajectories to its longest sample, and an
answer must not depend on its batch mates. A trace stays in torch on the CPU, so the detection and
selective scores (models/' own functions) read it as a one-sample `SolveResult`, and the answer's
numbers are read off it once, when the JSON answer is built (answers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deqguard.models.classifier import SolveResult
from deqguard.models.entropy import prediction_entropy
from deqguard.solve_rules import STOP_REASONS


@dataclass(frozen=True)
class SampleTrace:
    """One sample's solve, its trajectories already cut to its own iterations."""

    logits: Tensor  # [K] float32
    entropy: Tensor  # [T] nats, one per iterate
    residual: Tensor  # [T] relative residual of each iterate
    iterations: int
    converged: bool
    stopped: str = "max_iter"  # one of STOP_REASONS
    features: dict[str, Tensor] | None = None  # {name: [1]} dynamics features, when computed
    rectifier: Tensor | None = None  # [1] the rectifier head's logit, for a model with one

    def __reduce__(self) -> tuple:
        """Pickled as plain numbers (exactly, dtypes kept): torch pickles each tensor as a
        shared-memory segment or a serialized storage, which for local scoring's row processes
        cost more than building the answers."""
        feats = (None if self.features is None else
                 {k: _plain(v) for k, v in self.features.items()})
        head = None if self.rectifier is None else _plain(self.rectifier)
        return (_rebuild, (_plain(self.logits), _plain(self.entropy), _plain(self.residual),
                           self.iterations, self.converged, self.stopped, feats, head))

    def as_result(self) -> SolveResult:
        """This trace as a batch of one (views, no copies), the form models/' scores read."""
        return SolveResult(
            logits=self.logits[None], entropy=self.entropy[:, None],
            residual=self.residual[:, None], iterations=torch.tensor([self.iterations]),
            converged=torch.tensor([self.converged]), features=self.features,
            rectifier=self.rectifier)


def stack_traces(traces: Sequence[SampleTrace]) -> SolveResult:
    """Traces (at least one) as one batch of their final answers, for the scores that read a
    sample's answer only (logits, dynamics features, rectifier logit, iteration count): its
    trajectories are empty, since the traces' lengths differ. `features` (or `rectifier`) is
    None unless every trace has it."""
    feats = None
    if all(t.features is not None for t in traces):
        feats = {k: torch.cat([t.features[k] for t in traces])  # type: ignore[index]
                 for k in traces[0].features}  # type: ignore[union-attr]
    heads = [t.rectifier for t in traces]
    n = len(traces)
    return SolveResult(
        logits=torch.stack([t.logits for t in traces]), entropy=torch.empty(0, n),
        residual=torch.empty(0, n), iterations=torch.tensor([t.iterations for t in traces]),
        converged=torch.tensor([t.converged for t in traces]), features=feats,
        rectifier=None if any(h is None for h in heads) else torch.cat(heads))  # type: ignore


def _plain(t: Tensor) -> tuple[list, torch.dtype]:
    return t.tolist(), t.dtype


def _rebuild(logits: tuple, entropy: tuple, residual: tuple, iterations: int, converged: bool,
             stopped: str, features: dict[str, tuple] | None,
             rectifier: tuple | None = None) -> SampleTrace:
    def tensor(plain: tuple) -> Tensor:
        return torch.tensor(plain[0], dtype=plain[1])

    return SampleTrace(logits=tensor(logits), entropy=tensor(entropy), residual=tensor(residual),
                       iterations=iterations, converged=converged, stopped=stopped,
                       features=None if features is None else
                       {k: tensor(v) for k, v in features.items()},
                       rectifier=None if rectifier is None else tensor(rectifier))


def split_batch(result: SolveResult) -> list[SampleTrace]:
    """A batch solve -> per-sample traces cut to each sample's iteration count.

    Without `result.stopped` a sample stopped at "tol" when converged, else at "max_iter"; without
    an entropy trajectory (a feed-forward model) its one entropy is the prediction's.
    """
    logits = result.logits.detach().float().cpu()
    entropy = None if result.entropy is None else result.entropy.detach().float().cpu()
    residual = result.residual.detach().float().cpu()
    iterations = result.iterations.cpu().tolist()
    converged = result.converged.cpu().tolist()
    stopped = None if result.stopped is None else result.stopped.cpu().tolist()
    features = (None if result.features is None else
                {k: v.detach().double().cpu() for k, v in result.features.items()})
    head = None if result.rectifier is None else result.rectifier.detach().float().cpu()
    out = []
    for i in range(logits.shape[0]):
        it = max(int(iterations[i]), 1)
        ent = (entropy[:it, i] if entropy is not None and entropy.numel()
               else prediction_entropy(logits[i:i + 1]))
        res = residual[:it, i] if residual.numel() else torch.zeros(1)
        why = (STOP_REASONS[stopped[i]] if stopped is not None
               else "tol" if converged[i] else "max_iter")
        # clones: a sample's trace must not hold on to its whole batch's storage
        out.append(SampleTrace(
            logits=logits[i].clone(), entropy=ent.clone(), residual=res.clone(), iterations=it,
            converged=bool(converged[i]), stopped=why,
            features=None if features is None else
            {k: v[i:i + 1].clone() for k, v in features.items()},
            rectifier=None if head is None else head[i:i + 1].clone()))
    return out
