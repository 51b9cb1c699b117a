"""The names, defaults and ranges of a solve's options and outcomes, each written once.

The models (solver config, the solvers' stop reasons, the selective calibration), the service
(its option rules and the HTTP schema) and the HTTP client all read them from here. The client
imports the schema without torch, and any module under `deqguard.models` imports torch with its
package, so the rules the models own live in this torch-free module and models/ imports them.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

# The built-in solvers (models.solvers registers these; a custom one is for library use only).
SOLVERS: tuple[str, ...] = ("naive", "anderson", "broyden")
# Inference-time defenses a request may ask for.
DEFENSES: tuple[str, ...] = ("none", "entropy-reduction")
# Why a sample's solve stopped; the solvers report an index into this tuple. "budget" is the
# server's own deadline (its per-request compute budget): the solver stops at it as at "deadline",
# and the service names it apart, so a caller can tell a cut it asked for from one it did not.
DEADLINE_STOP = "deadline"
BUDGET_STOP = "budget"
STOP_REASONS: tuple[str, ...] = ("max_iter", "tol", "settled", DEADLINE_STOP, BUDGET_STOP)
# The most solver iterations a checkpoint's config may ask for (the server applies a lower cap).
MAX_ITER_BOUND = 1000

# Selective answering: the share of clean inputs to answer, in (COVERAGE_LOW, FULL_COVERAGE].
# FULL_COVERAGE, the default, answers everything.
FULL_COVERAGE = 1.0
COVERAGE_LOW = 0.0  # excluded


def coverage_problem(coverage: Any) -> str | None:
    """Why `coverage` is not a valid coverage, or None (NaN and non-numbers are invalid)."""
    if isinstance(coverage, Real) and COVERAGE_LOW < coverage <= FULL_COVERAGE:
        return None
    return (f"coverage must be a number in ({COVERAGE_LOW:g}, {FULL_COVERAGE:g}] "
            f"({FULL_COVERAGE:g}: always answer), got {coverage!r}")

