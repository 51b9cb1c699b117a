"""Selective answers in the serving engines, in process: the decision matches the calibration,
what cannot be honoured is refused with a reason, old checkpoints still answer at coverage 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from selective_ckpt import calibrated_copy, cheap_detector, val_images, with_detector

from deqguard.models import load_checkpoint, read_metadata
from deqguard.models.selective import doubt_score, selective_from_metadata
from deqguard.serving.options import OptionsError
from deqguard.serving.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    return calibrated_copy(tiny_checkpoint, tmp_path_factory.mktemp("sel") / "tiny-sel.safetensors")


@pytest.fixture(scope="module")
def engine(calibrated):
    return TorchEngine.load(str(calibrated), device="cpu", threads=1)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """Held-out pattern images and noisy ones: some sure answers, some doubtful."""
    xv, _ = val_images(24)
    g = torch.Generator().manual_seed(1)
    noisy = (xv[:12] + 0.6 * torch.rand(xv[:12].shape, generator=g)).clamp(0, 1)
    return torch.cat([xv[:12], noisy]).numpy()


def test_abstains_exactly_when_the_score_is_over_the_coverage_threshold(engine, calibrated, x):
    cal = selective_from_metadata(read_metadata(calibrated))
    model, _ = load_checkpoint(calibrated, device="cpu")
    with torch.no_grad():
        want = doubt_score(model.solve(torch.from_numpy(x)), "max_softmax").numpy()
    seen = set()
    for c in (0.3, 0.65, 0.9, 0.999):
        answers = engine.classify(x, engine.resolve(coverage=c))
        t = cal.threshold(c)
        for a, s in zip(answers, want, strict=True):
            assert a.selective.coverage == c and a.selective.score_name == "max_softmax"
            assert a.selective.score == pytest.approx(float(s), abs=1e-6)
            assert a.selective.threshold == t
            assert a.abstained == (a.selective.score > t)
            seen.add(a.abstained)
    assert seen == {True, False}  # both outcomes happen on these inputs
    full = engine.classify(x, engine.resolve(coverage=1.0))
    assert not any(a.abstained for a in full) and all(a.selective.threshold is None for a in full)


def test_coverage_below_one_solves_in_full(engine, x):
    """The settled exit stands aside below coverage 1: the thresholds were set on full solves."""
    sel = engine.classify(x, engine.resolve(coverage=0.9))
    full = engine.classify(x, engine.resolve(settle_iters=0))
    assert [a.iterations for a in sel] == [a.iterations for a in full]
    assert all(a.stopped != "settled" for a in sel)


def test_old_checkpoint_refuses_coverage_below_one_and_answers_at_one(tiny_checkpoint, x):
    old = TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)
    with pytest.raises(OptionsError, match="needs a selective calibration.*coverage 1"):
        old.resolve(coverage=0.9)
    a = old.classify(x[:2], old.resolve(coverage=1.0))[0]
    assert a.abstained is False and a.selective.score is None and a.selective.threshold is None
    assert old.describe()["serving"]["selective"] is None


@pytest.mark.parametrize("options, words", [
    ({"coverage": 0.05}, "below the lowest calibrated coverage 0.1"),
    ({"coverage": 0.0}, "coverage must be a number in (0, 1]"),
    ({"coverage": 1.5}, "coverage must be a number in (0, 1]"),
    ({"coverage": float("nan")}, "coverage must be a number in (0, 1]"),
    ({"coverage": 0.5, "defense": "entropy-reduction"}, "not to the entropy-reduction defense"),
    ({"coverage": 0.5, "deadline_ms": 50}, "drop deadline_ms"),
])
def test_what_cannot_be_honoured_is_refused(engine, options, words):
    with pytest.raises(OptionsError) as err:
        engine.resolve(**options)
    assert words in str(err.value)


def test_solve_dependent_scores_refuse_another_solve(tiny_checkpoint, tmp_path, x):
    path = calibrated_copy(tiny_checkpoint, tmp_path / "ment.safetensors", "mean_entropy")
    eng = TorchEngine.load(str(path), device="cpu", threads=1)
    eng.classify(x[:2], eng.resolve(coverage=0.8))  # the calibrated solve works
    for opts in ({"solver": "naive"}, {"tol": 1e-2}, {"max_iter": 5}):
        with pytest.raises(OptionsError, match="depends on the solve"):
            eng.resolve(coverage=0.8, **opts)
        eng.resolve(coverage=1.0, **opts)  # nothing to decide at coverage 1
    # an answer-only score takes any solve
    engine = TorchEngine.load(str(calibrated_copy(tiny_checkpoint, tmp_path / "ms.safetensors")),
                              device="cpu", threads=1)
    engine.resolve(coverage=0.8, solver="naive", max_iter=5)


def test_the_detector_score_is_the_learned_detectors(tiny_checkpoint, tmp_path, x):
    path = with_detector(tiny_checkpoint, tmp_path / "det.safetensors")
    calibrated_copy(path, path, "detector")
    eng = TorchEngine.load(str(path), device="cpu", threads=1)
    model, meta = load_checkpoint(path, device="cpu")
    det = eng.selector.detector
    with torch.no_grad():
        want = det.score(model.solve(torch.from_numpy(x), features=det.dynamics).features)
    for detect in (True, False):  # the selective score needs the features either way
        answers = eng.classify(x, eng.resolve(coverage=0.7, detect=detect))
        np.testing.assert_allclose([a.selective.score for a in answers], want.numpy(),
                                   atol=1e-5)
        assert all(a.selective.score_name == "detector" for a in answers)
        assert all(a.detection.detector == ("dynamics-logistic" if detect else "off")
                   for a in answers)
    assert eng.describe()["serving"]["selective"]["score"] == "detector"
    assert eng.describe()["selective"]["model_sha256"] == meta.sha256


@pytest.fixture(scope="module")
def onnx_graph(calibrated, tmp_path_factory):
    """The calibrated checkpoint exported to ONNX (its metadata, the calibration included,
    travels in the graph)."""
    from deqguard.cli import main

    out = tmp_path_factory.mktemp("sel-onnx") / "tiny.onnx"
    assert main(["export-onnx", str(calibrated), "--iterations", "30", "--out", str(out)]) == 0
    return out


def test_onnx_backend_answers_selectively_like_torch(onnx_graph, engine, x):
    from deqguard.serving.onnx_engine import OnnxEngine

    onnx = OnnxEngine(onnx_graph)
    got = onnx.classify(x, onnx.resolve(coverage=0.65))
    want = engine.classify(x, engine.resolve(coverage=0.65, solver="naive"))
    for a, b in zip(got, want, strict=True):
        assert a.selective.threshold == b.selective.threshold
        assert a.selective.score == pytest.approx(b.selective.score, abs=1e-4)
        if abs(b.selective.score - b.selective.threshold) > 1e-4:
            assert a.abstained == b.abstained


def test_onnx_backend_refuses_what_it_cannot_score(onnx_graph, tiny_checkpoint, tmp_path):
    """The detector score needs autograd features; a trajectory score calibrated on Anderson
    means nothing on the graph's naive iteration."""
    from deqguard.models.selective import calibrate
    from deqguard.serving.onnx_engine import OnnxEngine
    from deqguard.serving.selective import Selector

    onnx = OnnxEngine(onnx_graph)
    sha = onnx.meta.sha256
    scores = np.linspace(0, 1, 50)
    det = cheap_detector(sha)
    onnx.selector = Selector(calibrate(scores, "detector", model_sha256=sha, detector=det),
                             detector=det)
    with pytest.raises(OptionsError, match="does not compute"):
        onnx.resolve(coverage=0.9)
    onnx.selector = Selector(calibrate(scores, "iterations", model_sha256=sha,
                                       solve={"solver": "anderson", "max_iter": 30,
                                              "tol": 1e-3}))
    with pytest.raises(OptionsError, match="solver=anderson"):
        onnx.resolve(coverage=0.9)
    onnx.resolve(coverage=1.0)


def test_a_selective_answer_the_servers_budget_cut_abstains(engine, x):
    """The server's budget is no option of the request: a selective request is not refused for
    it, and an answer it cut abstains (the thresholds were set on full solves); at coverage 1
    it is answered, saying stopped='budget'."""
    import time

    n = len(x)
    past, far = [time.time() - 1] * n, [time.time() + 3600] * n
    sel = engine.resolve(coverage=0.9)
    cut = [engine.result(t, sel, False) for t in engine.classify_grouped(list(x), [sel] * n,
                                                                          budgets=past)]
    assert all(a.stopped == "budget" and a.abstained for a in cut)
    assert all(a.selective.threshold is not None for a in cut)
    full = engine.resolve(coverage=1.0)
    answered = [engine.result(t, full, False)
                for t in engine.classify_grouped(list(x), [full] * n, budgets=past)]
    assert all(a.stopped == "budget" and not a.abstained for a in answered)
    short_of_it = [engine.result(t, sel, False)
                   for t in engine.classify_grouped(list(x), [sel] * n, budgets=far)]
    assert ([a.model_dump() for a in short_of_it]
            == [a.model_dump() for a in engine.classify(x, sel, trajectory=False)])


def test_the_selector_abstains_on_a_budget_cut_whatever_the_score():
    """A sure answer (doubt far under the threshold) abstains below coverage 1 when the
    server's budget stopped it, and only then."""
    from deqguard.models.selective import SelectiveCalibration
    from deqguard.serving.options import SolveOptions
    from deqguard.serving.selective import Selector
    from deqguard.serving.traces import SampleTrace

    cal = SelectiveCalibration(score="max_softmax", coverages=[0.5, 0.8, 1.0],
                               thresholds=[0.5, 0.8, 1.0], realised=[0.5, 0.8, 1.0],
                               n_calibration=10)
    selector = Selector(cal)
    opts = SolveOptions(max_iter=5, tol=1e-3, solver="naive", coverage=0.8)
    sure = torch.tensor([30.0, 0.0, 0.0])

    def trace(stopped: str) -> SampleTrace:
        return SampleTrace(logits=sure, entropy=torch.zeros(1), residual=torch.ones(1),
                           iterations=1, converged=False, stopped=stopped)

    for stopped in ("deadline", "max_iter", "tol"):
        abstained, block = selector(trace(stopped), opts)
        assert not abstained and block.score < block.threshold
    assert selector(trace("budget"), opts)[0]
    full = SolveOptions(max_iter=5, tol=1e-3, solver="naive")
    assert not selector(trace("budget"), full)[0]
