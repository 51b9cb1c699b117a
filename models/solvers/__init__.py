"""Fixed-point solvers behind one registry.

Every solver has the signature ``solve(f, z0, *, max_iter, tol, stop_mode, on_iterate,
keep_states, **options) -> SolverOutput`` so that models, training and serving pick one by name
from a config::

    from deqguard.models.solvers import get_solver
    out = get_solver("anderson")(lambda z: 0.5 * z + 1.0, torch.zeros(4, 3), max_iter=50)
    out.z, out.residual, out.iterations, out.converged
"""

from __future__ import annotations

from collections.abc import Callable

from .anderson import anderson_solve
from .base import STOP_REASONS, Fn, SolverOutput, StopHook, residual
from .broyden import broyden_solve
from .naive import naive_solve

Solver = Callable[..., SolverOutput]

_SOLVERS: dict[str, Solver] = {
    "naive": naive_solve,
    "anderson": anderson_solve,
    "broyden": broyden_solve,
}


def get_solver(name: str) -> Solver:
    """The solver registered under `name`; a clear error lists the known ones."""
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {sorted(_SOLVERS)}") from None


def register_solver(name: str, solver: Solver) -> None:
    """Make a custom solver available to every config that names it."""
    _SOLVERS[name] = solver


def solver_names() -> list[str]:
    return sorted(_SOLVERS)


__all__ = ["STOP_REASONS", "Fn", "SolverOutput", "StopHook", "get_solver",
           "register_solver", "residual", "solver_names",
           "naive_solve", "anderson_solve", "broyden_solve"]
