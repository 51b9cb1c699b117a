"""Each rule of a solve's options has one definition (deqguard/solve_rules.py, or the models for
model-level ones) that the schema, the engine, the models and the clients read, and a served
answer stays in torch from the solve to the JSON."""

from __future__ import annotations

import ast
import pickle
from typing import get_args

import numpy as np
import pytest
import torch
from test_layout import modules

from deqguard.models.classifier import SolveResult
from deqguard.models.config import SolverConfig, SolverName
from deqguard.models.selective import DEFAULT_COVERAGES, SelectiveCalibration, coverage_threshold
from deqguard.serving.options import SolveOptions, option_problem
from deqguard.serving.schema import (
    SOLVE_OPTION_FIELDS,
    ClassifyOptions,
    ClassifyRequest,
    DefenseChoice,
    Selective,
    SolverChoice,
    StopReason,
)
from deqguard.serving.selective import Selector
from deqguard.serving.traces import SampleTrace, split_batch
from deqguard.serving.validation import options_of
from deqguard.solve_rules import (
    COVERAGE_LOW,
    DEFENSES,
    FULL_COVERAGE,
    MAX_ITER_BOUND,
    SOLVERS,
    STOP_REASONS,
    coverage_problem,
)

NAME_LISTS = {"SOLVERS": SOLVERS, "DEFENSES": DEFENSES, "STOP_REASONS": STOP_REASONS}
BAD_COVERAGES = (0.0, -0.1, 1.5, float("nan"), "most")


def _options(**kw) -> SolveOptions:
    return SolveOptions(**{"max_iter": 5, "tol": 1e-3, "solver": "anderson", **kw})


def _calibration() -> SelectiveCalibration:
    return SelectiveCalibration(score="max_softmax", coverages=[0.5, 0.8, 1.0],
                                thresholds=[1.0, 2.5, 3.0], realised=[0.5, 0.8, 1.0],
                                n_calibration=10)


def test_no_module_spells_out_a_list_of_names_of_its_own():
    """A tuple, list or set of string literals equal to one of the name lists (in any order)
    may only stand in solve_rules.py; every other module imports it."""
    wanted = {frozenset(v): k for k, v in NAME_LISTS.items()}
    found = []
    for name, path in modules().items():
        if name == "deqguard.solve_rules":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                key = frozenset(e.value for e in node.elts)
                if key in wanted:
                    found.append(f"{name}:{node.lineno} restates {wanted[key]}")
    assert not found, "\n".join(found)


def test_the_schema_models_and_solvers_read_the_same_name_lists():
    from deqguard.models.solvers import STOP_REASONS as SOLVER_STOPS

    assert SOLVER_STOPS is STOP_REASONS
    assert get_args(StopReason) == STOP_REASONS
    assert get_args(SolverChoice) == SOLVERS == get_args(SolverName)
    assert get_args(DefenseChoice) == DEFENSES


def test_coverage_default_and_range_come_from_one_module():
    field = ClassifyOptions.model_fields["coverage"]
    assert field.default is FULL_COVERAGE
    bounds = {type(m).__name__: m for m in field.metadata}
    assert bounds["Gt"].gt is COVERAGE_LOW and bounds["Le"].le is FULL_COVERAGE
    assert Selective().coverage is FULL_COVERAGE
    assert _options().coverage is FULL_COVERAGE
    assert DEFAULT_COVERAGES[-1] is FULL_COVERAGE
    assert ClassifyRequest(image="x").coverage is FULL_COVERAGE


@pytest.mark.parametrize("bad", BAD_COVERAGES)
def test_an_invalid_coverage_is_refused_with_one_message_everywhere(bad):
    message = coverage_problem(bad)
    assert message and message.startswith("coverage must be a number in (0, 1]")
    assert option_problem(_options(coverage=bad), max_iter_cap=10, cap_text="10",
                          is_deq=True) == message
    with pytest.raises(ValueError) as err:
        _calibration().threshold(bad)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        coverage_threshold(np.arange(10.0), bad)
    assert str(err.value) == message
    with pytest.raises(ValueError):  # the wire schema refuses it too (pydantic's message)
        ClassifyOptions(coverage=bad)


def test_the_lowest_coverage_refusal_is_the_calibrations():
    cal = _calibration()
    message = cal.coverage_problem(0.3)
    assert message and "below the lowest calibrated coverage 0.5" in message
    assert Selector(cal).problem(_options(coverage=0.3), features=True) == message
    with pytest.raises(ValueError) as err:
        cal.threshold(0.3)
    assert str(err.value) == message
    assert cal.coverage_problem(0.5) is None and Selector(cal).problem(
        _options(coverage=0.5), features=True) is None


def test_the_iteration_bound_is_the_configs():
    assert SolverConfig(max_iter=MAX_ITER_BOUND).max_iter == MAX_ITER_BOUND
    with pytest.raises(ValueError):
        SolverConfig(max_iter=MAX_ITER_BOUND + 1)
    with pytest.raises(ValueError):
        ClassifyOptions(settle_iters=MAX_ITER_BOUND + 1)


def test_the_front_sends_every_solve_option_the_engine_resolves():
    """A field added to the schema reaches the engine without another file naming it."""
    import inspect

    from deqguard.serving.options import fill

    sent = options_of(ClassifyRequest(image="x", coverage=0.5, settle_iters=2))
    assert set(sent) == set(SOLVE_OPTION_FIELDS) == set(ClassifyOptions.model_fields) - {
        "trajectory"}
    assert set(sent) == set(inspect.signature(fill).parameters) - {"defaults"} | {"deadline_ms"}
    assert sent["coverage"] == 0.5 and sent["settle_iters"] == 2


def test_device_auto_is_resolved_in_one_place():
    from deqguard.errors import DeqguardError
    from deqguard.models.device import resolve_device
    from deqguard.training.loop import pick_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == want
    assert pick_device("auto") == torch.device(want)
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeqguardError, match="no CUDA"):
            resolve_device("cuda")


def test_traces_stay_in_torch_and_score_without_copies():
    """split_batch cuts each sample to its own iterations; its one-sample SolveResult views the
    trace's own tensors (no numpy round trip); pickling keeps every value and dtype exactly."""
    logits = torch.randn(2, 3)
    entropy = torch.rand(4, 2)
    residual = torch.rand(4, 2)
    result = SolveResult(logits=logits, residual=residual, iterations=torch.tensor([2, 4]),
                         converged=torch.tensor([True, False]), entropy=entropy,
                         stopped=torch.tensor([STOP_REASONS.index("tol"), 0]),
                         features={"f": torch.tensor([0.5, 0.25], dtype=torch.float64)})
    a, b = split_batch(result)
    assert (a.iterations, a.stopped, b.iterations, b.stopped) == (2, "tol", 4, "max_iter")
    torch.testing.assert_close(a.entropy, entropy[:2, 0], rtol=0, atol=0)
    view = a.as_result()
    assert view.logits.data_ptr() == a.logits.data_ptr()
    assert view.entropy.data_ptr() == a.entropy.data_ptr()
    back = pickle.loads(pickle.dumps(a))
    assert isinstance(back, SampleTrace)
    for name in ("logits", "entropy", "residual"):
        got, want = getattr(back, name), getattr(a, name)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert back.features["f"].dtype == torch.float64 and float(back.features["f"]) == 0.5
    assert (back.iterations, back.converged, back.stopped) == (2, True, "tol")


def test_local_scoring_resolves_every_option_as_the_server_does(tiny_checkpoint):
    """The settled exit's options reach the local engine (they were dropped before)."""
    from deqguard.clients.local import ModelScorer

    scorer = ModelScorer(str(tiny_checkpoint), {"settle_iters": 0, "settle_entropy": 0.5},
                         device="cpu")
    assert scorer.solve_options.settle_iters == 0
    assert scorer.solve_options.settle_entropy == 0.5
    assert scorer.engine.max_iter_cap == MAX_ITER_BOUND
