"""CUDA graphs of the regulated training forward, one per solver depth.

On a GPU a training step of the default's preset is launch-bound: about 2,250 operators (a CPU
profile, bench/train_step.py --count-ops) took 106 ms per step of 128 on an H200 (45.6 s per
epoch, README), about 47 us each, far more than their arithmetic at this size. With the
regulation every forward runs a depth n drawn on the host, and a sync-free solve
(models/solvers/base.py) makes the forward at depth n a fixed sequence of kernels on (x, the
weights): it can be captured once per depth and replayed, its forward and its backward one
launch each (torch.cuda.make_graphed_callables, which keeps autograd working across them).

Two captures per depth: the attack's (eval mode, x requiring grad; only x's gradient is taken,
so the weights are constants of that graph) and the update's (train mode; the weights are
inputs, so their gradients flow into `.grad` as in eager mode). Forwards that need more than
the logits (the Jacobian term, the rectifier head) run eagerly. Replays compute what the eager
sync-free forward computes, with the same kernels; bench/train_step.py --cuda-graphs measures
both and compares their losses.

A replay writes its graph's static outputs and saved tensors: a graph replayed again before
the backward of its previous replay would hand that backward the wrong tensors. The attack's
forwards are each differentiated before the next; the update's forwards (two with a clean
term, TRADES' pair) all wait for one backward, so a caller passes `once`, the keys already
replayed for this update, and a repeat runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..models.classifier import DEQClassifier
from ..models.config import GradConfig

Capture = Callable[[Callable[[Tensor], Tensor], tuple[Tensor, ...]], Callable[[Tensor], Tensor]]


class DepthForward(nn.Module):
    """The regulated forward at one depth: sync-free solve, gradient path, logits.

    A module so that a capture of the update can take the model's weights as its inputs; the
    mean number of steps the solve took is left in a buffer (a graph's outputs are tensors
    that autograd tracks, and the count is not one to differentiate).
    """

    def __init__(self, model: DEQClassifier, n: int, *, solver: str | None, tol: float | None,
                 grad: GradConfig | None, readout: str):
        super().__init__()
        self.model = model
        self.n, self.solver, self.tol, self.grad, self.readout = n, solver, tol, grad, readout
        p = next(model.parameters())
        self.register_buffer("mean_iterations", torch.zeros((), device=p.device),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        eq = self.model.equilibrium(x, solver=self.solver, max_iter=self.n, tol=self.tol,
                                    grad=self.grad, readout=self.readout, sync_free=True)
        with torch.no_grad():
            self.mean_iterations.copy_(eq.output.iterations.float().mean())
        return self.model.decode(eq.z)


def cuda_capture(fn: Callable[[Tensor], Tensor], sample: tuple[Tensor, ...]
                 ) -> Callable[[Tensor], Tensor]:
    """torch's capture of `fn` (forward and backward) at the sample's shape and grad state."""
    return torch.cuda.make_graphed_callables(fn, sample, allow_unused_input=True)


class DepthGraphs:
    """Captured forwards by (depth, mode, input shape and grad state), built on first use.

    `capture` makes the replayable callable; torch's CUDA capture by default (tests pass an
    eager stand-in to check everything around it on a CPU).
    """

    def __init__(self, model: DEQClassifier, capture: Capture = cuda_capture):
        self.model = model
        self.capture = capture
        self._graphs: dict[tuple, tuple[Callable[[Tensor], Tensor], DepthForward]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: Tensor, n: int, *, solver: str | None, tol: float | None,
                 grad: GradConfig | None, readout: str, once: set[tuple] | None = None
                 ) -> tuple[Tensor, Tensor] | None:
        """(logits, the solve's mean step count) of the forward at depth n; None (run it
        eagerly) when its key is in `once`, which gains the key otherwise (see the module)."""
        key = (n, self.model.training, x.requires_grad, tuple(x.shape), x.dtype,
               x.stride(), torch.is_autocast_enabled(x.device.type), solver, tol, readout, grad)
        if once is not None:
            if key in once:
                return None
            once.add(key)
        entry = self._graphs.get(key)
        if entry is None:
            depth = DepthForward(self.model, n, solver=solver, tol=tol, grad=grad,
                                 readout=readout)
            # The attack's capture takes only x: its backward computes no weight gradients.
            fn: Any = depth if not x.requires_grad else (lambda t: depth(t))
            sample = (x.detach().clone().requires_grad_(x.requires_grad),)
            entry = (self.capture(fn, sample), depth)
            self._graphs[key] = entry
        graphed, depth = entry
        logits = graphed(x)
        # the buffer is rewritten by the next replay: a copy for the caller
        return logits, depth.mean_iterations.clone()
