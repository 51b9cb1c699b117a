"""A request's solve options: resolved against the checkpoint's defaults, then checked.

`SolveOptions` is also the key concurrent requests are grouped by: each distinct set runs as its
own sub-batch (engine.py). `option_problem` holds the rules every backend shares; a backend adds
its own refusals (the ONNX graph's fixed solver) and the selective ones come from selective.py.
Each refusal is a message the front answers with a 422.
"""

from __future__ import annotations

from dataclasses import dataclass

from deqguard.solve_rules import DEFENSES, FULL_COVERAGE, coverage_problem

# The settled exit's defaults for plain (undefended) requests, measured with bench/anytime.py on
# the shipped default and 300 Fashion-MNIST test images (README, Serving).
DEFAULT_SETTLE_ITERS = 3
DEFAULT_SETTLE_ENTROPY = 0.3


class OptionsError(ValueError):
    """Options the engine cannot honour (over the cap, unsupported by the backend)."""


@dataclass(frozen=True)
class SolveOptions:
    """Fully resolved solve options: the key requests are grouped by when batched."""

    max_iter: int
    tol: float
    solver: str
    defense: str = "none"
    settle_iters: int = 0  # 0: no settled exit
    settle_entropy: float = DEFAULT_SETTLE_ENTROPY
    detect: bool = True
    coverage: float = FULL_COVERAGE  # selective answering: full coverage answers everything


def fill(defaults: SolveOptions, *, max_iter: int | None = None, tol: float | None = None,
         solver: str | None = None, defense: str | None = None,
         settle_iters: int | None = None, settle_entropy: float | None = None,
         detect: bool | None = None, coverage: float | None = None) -> SolveOptions:
    """`defaults` with each option the request set. `coverage` is kept as sent, so that
    `option_problem` can name a value that is no number."""
    d = defaults
    return SolveOptions(
        max_iter=d.max_iter if max_iter is None else int(max_iter),
        tol=d.tol if tol is None else float(tol),
        solver=d.solver if solver is None else str(solver),
        defense=defense or "none",
        settle_iters=d.settle_iters if settle_iters is None else int(settle_iters),
        settle_entropy=d.settle_entropy if settle_entropy is None else float(settle_entropy),
        detect=d.detect if detect is None else bool(detect),
        coverage=d.coverage if coverage is None else coverage)


def option_problem(opts: SolveOptions, *, max_iter_cap: int, cap_text: str,
                   is_deq: bool) -> str | None:
    """Why no backend can honour `opts`, or None. `cap_text` names the iteration cap in the
    message ("the server cap 100")."""
    if not 1 <= opts.max_iter <= max_iter_cap:
        return f"max_iter must be between 1 and {cap_text}, got {opts.max_iter}"
    if not 0 < opts.tol <= 1:
        return f"tol must be in (0, 1], got {opts.tol}"
    if opts.defense not in DEFENSES:
        return f"unknown defense {opts.defense!r}; known: {list(DEFENSES)}"
    if opts.defense != "none" and not is_deq:
        return "the entropy-reduction defense needs a DEQ checkpoint; this one is feed-forward"
    if opts.settle_iters < 0 or not opts.settle_entropy > 0:
        return (f"settle_iters must be >= 0 and settle_entropy > 0, got {opts.settle_iters} and "
                f"{opts.settle_entropy}")
    if opts.settle_iters and opts.defense != "none":
        return ("the settled exit applies to the plain solve, not to the "
                f"{opts.defense} defense; leave settle_iters unset or 0")
    return coverage_problem(opts.coverage)
