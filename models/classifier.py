"""The classifier interface every deqguard model implements, and the DEQ solve logic.

`model(x)` returns logits so that standard attack libraries can wrap any model. `model.solve(x)`
returns the prediction plus the per-iterate entropy and residual trajectories that serving and
detection use. A DEQ subclass only supplies four pieces: the input injection u = inject(x), the
layer f(z, u), the initial state, and the head decode(z).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .anytime import IterateWatcher, SettleRule
from .config import DEQConfig, GradConfig, SolverConfig
from .entropy import prediction_entropy
from .errors import InputError
from .grad import attach_gradient
from .layers import VariationalDropout2d
from .rectifier import Rectifier
from .solvers import SolverOutput, get_solver, residual

if TYPE_CHECKING:
    from .dynamics import DynamicsConfig

Readout = Literal["state", "unrolled"]


@dataclass
class SolveResult:
    """Prediction and trajectory of one solve.

    `entropy[t]` is the entropy (nats) of the head's prediction at the state after step t+1;
    `residual[t]` the relative residual ||f(z)-z||/||f(z)|| of the state step t+1 started from.
    Both are [T, B]; a sample that stopped early repeats its last value. `stopped` [B] says why
    each sample stopped (an index into models.solvers.STOP_REASONS; None when not tracked).
    """

    logits: Tensor
    residual: Tensor
    iterations: Tensor
    converged: Tensor
    entropy: Tensor | None = None
    z: Tensor | None = field(default=None, repr=False)
    states: list[Tensor] | None = field(default=None, repr=False)
    stopped: Tensor | None = None
    # [T, B] argmax of the head at each iterate (recorded with the entropy trajectory)
    predictions: Tensor | None = field(default=None, repr=False)
    # per-sample dynamics features {name: [B]} when `solve(features=...)` asked for them
    features: dict[str, Tensor] | None = field(default=None, repr=False)
    # [B] the rectifier head's logit A (models/rectifier.py), for a model that has one
    rectifier: Tensor | None = None

    @property
    def final_entropy(self) -> Tensor:
        return prediction_entropy(self.logits)


@dataclass
class Equilibrium:
    """Everything training-time code needs from one equilibrium solve."""

    z: Tensor  # the state carrying the requested gradient path
    z_star: Tensor  # the solver's answer, detached
    f: Callable[[Tensor], Tensor]
    output: SolverOutput
    entropy: Tensor | None
    predictions: Tensor | None = None
    z_init: Tensor | None = None  # the state the solver started from (z_0)


class Classifier(nn.Module):
    """Base of every deqguard model: logits from `forward`, trajectories from `solve`."""

    is_deq: bool = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        # a DEQ's trained doubt head (DEQClassifier.attach_rectifier); None: the plain network
        self.rectifier: Rectifier | None = None

    def check_input(self, x: Tensor) -> None:
        """Refuse inputs the model cannot have been trained on, with a message saying why."""
        c, s = self.config.in_channels, self.config.image_size
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise InputError(f"expected input of shape [N, {c}, {s}, {s}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise InputError("input contains NaN or infinite values")

    def solve(self, x: Tensor, **_: object) -> SolveResult:
        raise NotImplementedError


class FeedForwardClassifier(Classifier):
    """An explicit network seen through the DEQ interface: one step, nothing to converge."""

    def solve(self, x: Tensor, *, trajectory: bool = True, **_: object) -> SolveResult:
        logits = self(x)
        b = x.shape[0]
        ent = prediction_entropy(logits.detach()).unsqueeze(0) if trajectory else None
        return SolveResult(
            logits=logits, entropy=ent, residual=logits.new_zeros(1, b),
            iterations=torch.ones(b, dtype=torch.long, device=x.device),
            converged=torch.ones(b, dtype=torch.bool, device=x.device))


class DEQClassifier(Classifier):
    """A classifier whose features are the fixed point z* = f(z*, inject(x))."""

    is_deq = True
    config: DEQConfig

    def attach_rectifier(self) -> None:
        """Build the configured rectifier head, sized from the state one image solves in
        (`registry.build_model` calls this; the architectures need not know about it)."""
        cfg = self.config.rectifier
        if cfg is None:
            return
        c, s = self.config.in_channels, self.config.image_size
        with torch.no_grad():
            x = next(self.parameters()).new_zeros(1, c, s, s)
            size = self.initial_state(self.inject(x))[0].numel()
        self.rectifier = Rectifier(size, cfg).to(x.device)

    def rectifier_logit(self, z: Tensor, result: SolveResult) -> Tensor:
        """The head's A [B] at state z, with the trajectory features of `result` if it reads
        them (`result` must then carry the entropy trajectory)."""
        if self.rectifier is None:
            raise ValueError("this model has no rectifier head (model config 'rectifier')")
        length = self.rectifier.config.trajectory
        feats = None
        if length:
            from .detection_scores import trajectory_features

            feats = trajectory_features(result, length)
        return self.rectifier(z, feats)

    def graph_trajectory_features(self, eq: Equilibrium, length: int) -> Tensor:
        """The rectifier's path features [B, 2*length] computed from the kept iterates, with
        the autograd graph back to x (for the attacks aimed at the head; nothing served).

        The recorded features are read off the solve without a graph, so an attacker's gradient
        would reach the head only through the state. Here the entropies are the head's decode
        of each kept iterate and the residuals ||f(z_t) - z_t|| / ||f(z_t)|| are evaluated again
        at the kept z_t (one f per feature row), so their values are the recorded ones while the
        gradient flows through them. `eq` must come from `equilibrium(..., keep_states=True)`
        without a settle rule or deadline (rows past a sample's own steps repeat its last one,
        as the solver records them).
        """
        from .detection_scores import path_features

        states = eq.output.states
        if states is None or eq.z_init is None:
            raise ValueError("graph trajectory features need equilibrium(keep_states=True)")
        n = min(length, len(states))
        if n == 0:
            raise ValueError("graph trajectory features need at least one solver step")
        b = eq.z_init.shape[0]
        stop_mode = self.config.solver.stop_mode
        ent = prediction_entropy(self.decode(torch.cat(states[:n])).float()).view(n, b)
        starts = [eq.z_init, *states[:n - 1]]  # step t+1 started from z_t
        res = torch.stack([residual(eq.f(z), z, stop_mode).float() for z in starts])
        # a sample that stopped after its own `iterations` steps repeats its last row
        rows = torch.arange(n, device=res.device)[:, None]
        last = (eq.output.iterations.to(res.device) - 1).clamp_min(0)[None, :]
        own = torch.minimum(rows, last)
        return path_features(ent.gather(0, own), res.gather(0, own), length)

    # -- the four pieces a DEQ architecture supplies -------------------------------------------
    def inject(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def initial_state(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def layer_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """`layer` as a function of (z, u) for a solver's inner loop; an architecture whose layer
        can be bound to its current weights (bit for bit the same) returns that faster form."""
        return self.layer

    # -- solving --------------------------------------------------------------------------------
    def _reset_noise(self) -> None:
        for m in self.modules():
            if isinstance(m, VariationalDropout2d):
                m.reset()

    def _materialise_parametrizations(self) -> None:
        """Compute parametrized weights (weight norm) now, under the caller's grad mode.

        `parametrize.cached()` keeps the first value it computes. Were that first value computed
        inside the solver's `no_grad`, the gradient path would reuse a weight without a graph
        and the weight-normed convolutions would get no gradient at all.
        """
        for m in self.modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations:
                    getattr(m, name)

    def equilibrium(self, x: Tensor, *, solver: str | None = None, max_iter: int | None = None,
                    tol: float | None = None, grad: GradConfig | str | None = None,
                    readout: Readout = "state", trajectory: bool = False,
                    keep_states: bool = False, z0: Tensor | None = None,
                    settle: SettleRule | None = None,
                    deadline: Tensor | None = None, reference: bool = False,
                    sync_free: bool = False) -> Equilibrium:
        """Solve for z* and attach the requested gradient path.

        `readout="state"` returns a value equal to the solver's z* (gradient straight through the
        path); `"unrolled"` returns the path's own output, as the paper's training does.
        `settle` and `deadline` ([B] absolute time.time() seconds) are the anytime stops
        (models/anytime.py, models/solvers/base.py); both are off by default.

        By default the solve takes the fast path: the layer bound to its weights (`layer_fn`),
        f evaluated only on samples still iterating (eval mode, no autograd through the solve),
        and the trajectory decoded in one batch after the loop unless a settle rule needs it
        step by step. `reference=True` runs the plain path instead (module calls, every sample
        every step, a decode per step): the same answers, kept to test the fast one against.
        `sync_free=True` solves without reading the device back (models/solvers/base.py): the
        same answers, for a GPU whose steps are launch-bound (training does).
        """
        cfg: SolverConfig = self.config.solver
        grad_cfg = self._grad_config(grad)
        options = cfg.model_dump()
        name = options.pop("solver") if solver is None else solver
        options.pop("solver", None)
        options["max_iter"] = cfg.max_iter if max_iter is None else int(max_iter)
        options["tol"] = cfg.tol if tol is None else float(tol)
        solve_fn = get_solver(name)
        self._reset_noise()
        watcher = IterateWatcher(self.decode, settle, record=trajectory, deferred=not reference)
        if settle is not None:
            options["stop_when"] = watcher.stop_when
        if deadline is not None:
            options["deadline"] = deadline
        if sync_free:
            options["sync_free"] = True

        with parametrize.cached():
            self._materialise_parametrizations()
            u = self.inject(x)
            z_init = self.initial_state(u) if z0 is None else z0
            layer = self.layer if reference else self.layer_fn()

            def f(z: Tensor) -> Tensor:
                return layer(z, u)

            hook = watcher.on_iterate if trajectory or settle is not None else None
            exact = grad_cfg.mode == "exact" and torch.is_grad_enabled()
            # Skipping stopped samples needs per-sample f with no batch-shaped state: not in
            # training (a variational dropout mask spans the batch) nor under exact backprop.
            if not (reference or exact or self.training):
                options["f_rows"] = lambda z, rows: layer(z, u.index_select(0, rows))
            if exact:
                out = solve_fn(f, z_init, on_iterate=hook, keep_states=keep_states, **options)
                z = out.z
            else:
                with torch.no_grad():
                    out = solve_fn(f, z_init, on_iterate=hook, keep_states=keep_states, **options)
                z = attach_gradient(f, out.z, grad_cfg, straight_through=readout == "state")
        return Equilibrium(z=z, z_star=out.z.detach(), f=f, output=out, entropy=watcher.entropy,
                           predictions=watcher.prediction, z_init=z_init)

    def _grad_config(self, grad: GradConfig | str | None) -> GradConfig:
        if grad is None:
            return self.config.grad
        if isinstance(grad, str):
            return self.config.grad.model_copy(update={"mode": grad})
        return grad

    def solve(self, x: Tensor, *, solver: str | None = None, max_iter: int | None = None,
              tol: float | None = None, trajectory: bool = True,
              grad: GradConfig | str | None = None, keep_states: bool = False,
              settle: SettleRule | None = None, deadline: Tensor | None = None,
              features: DynamicsConfig | bool | None = None,
              reference: bool = False) -> SolveResult:
        """Run the solver with a per-call budget and decode the trajectory (serving, eval).

        `settle` / `deadline` add the anytime stops (see `equilibrium`); `stopped` says which
        criterion ended each sample. `features` (opt-in: they cost extra f evaluations, see
        `models/dynamics.py`) adds the per-sample dynamics features the learned detector reads;
        True means the defaults. A model with a rectifier head also returns its logit A
        (`result.rectifier`), through the state's gradient path. `reference=True`: the plain
        path (see `equilibrium`).
        """
        want = features is not None and features is not False
        path = self.rectifier is not None and self.rectifier.config.trajectory > 0
        eq = self.equilibrium(x, solver=solver, max_iter=max_iter, tol=tol, grad=grad,
                              trajectory=trajectory or want or path, keep_states=keep_states,
                              settle=settle, deadline=deadline, reference=reference)
        out = eq.output
        result = SolveResult(logits=self.decode(eq.z), entropy=eq.entropy,
                             residual=out.residual, iterations=out.iterations,
                             converged=out.converged, z=eq.z_star, states=out.states,
                             stopped=out.stopped, predictions=eq.predictions)
        if self.rectifier is not None:
            result.rectifier = self.rectifier_logit(eq.z, result)
        if want:
            from .dynamics import DynamicsConfig, dynamics_features

            cfg = features if isinstance(features, DynamicsConfig) else DynamicsConfig()
            result.features = dynamics_features(self, x, result, cfg, solver=solver,
                                                tol=tol)
        return result

    def forward(self, x: Tensor, *, solver: str | None = None, max_iter: int | None = None,
                tol: float | None = None, grad: GradConfig | str | None = None,
                readout: Readout = "state") -> Tensor:
        eq = self.equilibrium(x, solver=solver, max_iter=max_iter, tol=tol, grad=grad,
                              readout=readout)
        return self.decode(eq.z)


class StemCellDEQ(DEQClassifier):
    """The single-scale DEQ shape shared by the small architectures: a `stem` injects the image,
    one `cell(z, u)` is iterated from a zero state, a `head` decodes the state."""

    stem: nn.Module
    cell: nn.Module
    head: nn.Module

    def inject(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        return self.cell(z, u)

    def initial_state(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)

    def decode(self, z: Tensor) -> Tensor:
        return self.head(z)

    def layer_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        functional = getattr(self.cell, "functional", None)
        return functional() if callable(functional) else self.layer
