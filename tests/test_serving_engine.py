"""The serving engine in-process: detection calibration, option resolution, metrics, settings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deqguard.serving.options import OptionsError, SolveOptions
from deqguard.serving.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def x(pattern_data):
    return pattern_data[0][:6]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)


def _calibrated(tiny_checkpoint, tmp_path, **detection):
    from deqguard.models import update_metadata

    path = tmp_path / "calibrated.safetensors"
    shutil.copy(tiny_checkpoint, path)
    update_metadata(path, detection={"fpr": 0.05, **detection})
    return TorchEngine.load(str(path), device="cpu", threads=1)


def test_uncalibrated_detection_is_final_entropy_and_never_suspicious(engine, x):
    for r in engine.classify(x, engine.resolve(max_iter=5)):
        d = r.detection
        assert d.score_name == "final_entropy" and d.threshold is None and not d.suspicious
        assert d.score == pytest.approx(r.entropy[-1], abs=1e-6)


def test_calibration_threshold_flags_answers(tiny_checkpoint, tmp_path, x):
    plain = TorchEngine.load(str(tiny_checkpoint), device="cpu").classify(x, SolveOptions(
        max_iter=8, tol=1e-3, solver="anderson"))
    scores = sorted(r.detection.score for r in plain)
    threshold = (scores[2] + scores[3]) / 2  # half the samples above
    eng = _calibrated(tiny_checkpoint, tmp_path, score="final_entropy", threshold=threshold)
    got = eng.classify(x, SolveOptions(max_iter=8, tol=1e-3, solver="anderson"))
    assert [r.detection.suspicious for r in got] == [r.detection.score > threshold
                                                      for r in plain]
    assert sum(r.detection.suspicious for r in got) == 3
    assert all(r.detection.threshold == pytest.approx(threshold) for r in got)
    # a calibration made without the defense is not applied to defended answers
    defended = eng.classify(x[:2], eng.resolve(defense="entropy-reduction", max_iter=4))
    assert all(r.detection.threshold is None and not r.detection.suspicious for r in defended)


def test_trajectory_scores_read_the_samples_own_iterations(tiny_checkpoint, tmp_path, x):
    """mean_entropy over the returned (cut) trajectory, not the batch's padded one."""
    eng = _calibrated(tiny_checkpoint, tmp_path, score="mean_entropy", threshold=10.0)
    got = eng.classify(x, SolveOptions(max_iter=30, tol=0.05, solver="anderson"))
    assert len({r.iterations for r in got}) > 1  # samples stopped at different steps
    for r in got:
        assert len(r.entropy) == r.iterations
        assert r.detection.score == pytest.approx(np.mean(r.entropy), abs=1e-6)


def test_option_resolution(engine):
    cfg = engine.model.config.solver
    d = engine.resolve()
    assert (d.max_iter, d.tol, d.solver, d.defense) == (cfg.max_iter, cfg.tol, cfg.solver, "none")
    assert engine.resolve(max_iter=3, solver="naive").max_iter == 3
    assert engine.resolve(defense="entropy-reduction").max_iter == 8  # the defense's 4 x 2
    for kwargs, words in (({"max_iter": 0}, "between 1"), ({"max_iter": 101}, "server cap"),
                          ({"tol": 0.0}, "tol"), ({"defense": "magic"}, "unknown defense")):
        with pytest.raises(OptionsError, match=words):
            engine.resolve(**kwargs)


def test_feed_forward_checkpoint_is_served_but_refuses_the_defense(tmp_path, x):
    from deqguard.models import build_model, save_checkpoint

    path = tmp_path / "cnn.safetensors"
    save_checkpoint(build_model("cnn", num_classes=4, widths=(8, 8, 8), head_width=8).eval(),
                    path, {"name": "cnn", "classes": list("abcd")})
    eng = TorchEngine.load(str(path), device="cpu")
    r = eng.classify(x[:2], eng.resolve())
    assert [a.iterations for a in r] == [1, 1] and len(r[0].entropy) == 1
    assert eng.defenses() == ["none"]
    with pytest.raises(OptionsError, match="DEQ"):
        eng.resolve(defense="entropy-reduction")


def test_grouped_items_answer_like_separate_calls(engine, x):
    a = SolveOptions(max_iter=3, tol=1e-3, solver="naive")
    b = SolveOptions(max_iter=9, tol=1e-4, solver="broyden")
    opts = [a, b, a, b, b, a]
    mixed = engine.classify_grouped(list(x), opts)
    for i, (o, t) in enumerate(zip(opts, mixed, strict=True)):
        alone = engine.trace(x[i:i + 1], o)[0]
        assert t.iterations == alone.iterations
        np.testing.assert_array_equal(t.logits, alone.logits)
        np.testing.assert_array_equal(t.entropy, alone.entropy)


def test_metrics_observe_counts_suspicious_answers(tiny_checkpoint, tmp_path, x):
    from prometheus_client import REGISTRY

    from deqguard.serving import metrics

    eng = _calibrated(tiny_checkpoint, tmp_path, score="final_entropy", threshold=-1.0)
    opts = SolveOptions(max_iter=4, tol=1e-3, solver="naive")
    traces = eng.trace(x[:3], opts)
    labels = {"backend": "torch", "solver": "naive", "defense": "none"}
    before = REGISTRY.get_sample_value("deqguard_suspicious_answers_total", labels) or 0.0
    n_before = REGISTRY.get_sample_value("deqguard_solver_iterations_count", labels) or 0.0
    metrics.observe("torch", [(t, opts, eng.result(t, opts, True)) for t in traces])
    assert REGISTRY.get_sample_value("deqguard_suspicious_answers_total", labels) == before + 3
    assert REGISTRY.get_sample_value("deqguard_solver_iterations_count", labels) == n_before + 3


def test_settings_precedence(monkeypatch):
    from pydantic import ValidationError

    from deqguard.serving.settings import load_settings

    monkeypatch.setenv("DEQGUARD_CHECKPOINT", "/some/where.safetensors")
    monkeypatch.setenv("DEQGUARD_MAX_ITER_CAP", "12")
    monkeypatch.setenv("DEQGUARD_ONNX", "/x.onnx")
    s = load_settings()
    assert (s.checkpoint, s.max_iter_cap, s.onnx_path) == ("/some/where.safetensors", 12, "/x.onnx")
    assert s.max_body_bytes == 8 * 1024 * 1024 and s.backend == "torch" and s.threads == 1
    assert load_settings({"max_iter_cap": 5}).max_iter_cap == 5
    monkeypatch.setenv("DEQGUARD_BACKEND", "tensorflow")
    with pytest.raises(ValidationError):
        load_settings()


def test_settled_exit_stands_aside_while_a_calibrated_detector_reads_the_dynamics(
        tiny_checkpoint, tmp_path, x):
    """A threshold calibrated on full solves must see full solves: the settled exit only applies
    where no calibrated detector reads the trajectory (detect=false, or nothing calibrated)."""
    loose = {"max_iter": 30, "tol": 1e-9, "settle_iters": 1, "settle_entropy": 100.0}
    bare = TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)
    assert all(r.stopped == "settled" for r in bare.classify(x, bare.resolve(**loose)))
    eng = _calibrated(tiny_checkpoint, tmp_path, score="mean_entropy", threshold=10.0)
    detected = eng.classify(x, eng.resolve(**loose))
    full = eng.classify(x, eng.resolve(**{**loose, "settle_iters": 0}))
    assert all(r.stopped != "settled" for r in detected)
    assert [r.detection.score for r in detected] == [r.detection.score for r in full]
    skipped = eng.classify(x, eng.resolve(**loose, detect=False))
    assert all(r.stopped == "settled" and r.detection.detector == "off" for r in skipped)


# -- the server's per-request compute budget ------------------------------------------------------
# A budget already past when the solve starts stops a sample after its first iteration, as a
# passed deadline does: deterministic, no timing involved.

def test_the_servers_budget_cuts_a_request_and_the_answer_says_so(engine, x):
    import time

    opts = engine.resolve(max_iter=30, tol=1e-9, settle_iters=0)
    past, far, inf = time.time() - 1, time.time() + 3600, float("inf")
    # 0: the budget is over; 1: it caps a later deadline of the caller's own; 2: the caller's
    # deadline comes first; 3: a batch mate with neither
    traces = engine.classify_grouped(list(x[:4]), [opts] * 4, deadlines=[inf, far, past, inf],
                                     budgets=[past, past, far, inf])
    assert [t.stopped for t in traces] == ["budget", "budget", "deadline", "max_iter"]
    assert [t.iterations for t in traces] == [1, 1, 1, 30]
    answer = engine.result(traces[0], opts, True)
    assert (answer.stopped, answer.iterations, answer.converged) == ("budget", 1, False)
    assert len(answer.entropy) == len(answer.residual) == 1
    alone = engine.trace(x[3:4], opts)[0]
    np.testing.assert_array_equal(traces[3].logits, alone.logits)
    assert traces[3].iterations == alone.iterations


def test_without_the_budget_or_short_of_it_answers_are_unchanged(tiny_checkpoint, x):
    import time

    from deqguard.serving.factory import load_engine
    from deqguard.serving.settings import load_settings

    base = {"checkpoint": str(tiny_checkpoint), "backend": "torch", "device": "cpu"}
    plain = load_engine(load_settings(base))
    budgeted = load_engine(load_settings({**base, "request_budget_ms": 600_000}))
    assert plain.describe()["serving"]["request_budget_ms"] is None
    assert budgeted.describe()["serving"]["request_budget_ms"] == 600_000
    opts = plain.resolve(max_iter=12)
    want = [a.model_dump() for a in plain.classify(x, opts)]
    n = len(x)
    for eng, budgets in ((plain, None), (plain, [float("inf")] * n),
                         (budgeted, [time.time() + 600] * n)):
        traces = eng.classify_grouped(list(x), [opts] * n, budgets=budgets)
        assert [eng.result(t, opts, True).model_dump() for t in traces] == want


def test_the_budget_setting_is_validated(monkeypatch):
    from pydantic import ValidationError

    from deqguard.serving.settings import load_settings, settings_problem

    assert load_settings().request_budget_ms is None
    monkeypatch.setenv("DEQGUARD_REQUEST_BUDGET_MS", "250")
    assert load_settings().request_budget_ms == 250 and settings_problem() is None
    for bad in ("0", "-5", "600001", "soon"):
        monkeypatch.setenv("DEQGUARD_REQUEST_BUDGET_MS", bad)
        with pytest.raises(ValidationError):
            load_settings()
        problem = settings_problem()
        assert problem.startswith("server setting request_budget_ms "
                                  "($DEQGUARD_REQUEST_BUDGET_MS): ")
        assert repr(bad) in problem and "\n" not in problem
