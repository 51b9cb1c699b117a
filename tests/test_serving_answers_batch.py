"""A batch's answers built at once (`AnswerBuilder.answers`: one detector call, one doubt score,
one softmax over the batch) are the per-sample answers (`AnswerBuilder.answer`), byte for byte
in JSON, for every sample: on the tiny fixture with each batched score and a per-sample one, with
mixed options, and on the shipped default with detection and coverage on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pattern_images
from selective_ckpt import calibrated_copy, val_images, with_detector

from deqguard.models.learned_detector import LogisticDetector
from deqguard.serving import attack_detection, selective
from deqguard.serving.torch_engine import TorchEngine

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "weights" / "default.safetensors"


def images(n: int = 24) -> np.ndarray:
    """Held-out pattern images and noisy ones: sure answers and doubtful ones."""
    xv, _ = val_images(n // 2)
    g = torch.Generator().manual_seed(1)
    noisy = (xv + 0.6 * torch.rand(xv.shape, generator=g)).clamp(0, 1)
    return torch.cat([xv, noisy]).numpy()


def mismatches(engine: TorchEngine, traces: list, opts: list, trajectory: list) -> list[int]:
    """Samples whose batched answer's JSON differs from their one-sample answer's."""
    batched = engine.answers.answers(traces, opts, trajectory)
    alone = [engine.answers.answer(t, o, f) for t, o, f in zip(traces, opts, trajectory,
                                                                strict=True)]
    return [i for i, (a, b) in enumerate(zip(batched, alone, strict=True))
            if a.model_dump_json() != b.model_dump_json()]


@pytest.fixture(scope="module", params=["detector", "max_softmax", "mean_entropy"])
def engine(request, tiny_checkpoint, tmp_path_factory):
    """The fixture with a learned detector and a selective calibration of each score (the
    last one is computed sample by sample even in a batch)."""
    path = with_detector(tiny_checkpoint, tmp_path_factory.mktemp("ab") / "tiny.safetensors")
    calibrated_copy(path, path, request.param, n_val=60)
    return TorchEngine.load(str(path), device="cpu", threads=1)


def traced(engine: TorchEngine, x: np.ndarray, option_sets: list[dict]
           ) -> tuple[list, list, list]:
    """Every image under every option set, as the runner hands them over: one list, options
    and trajectory flags mixed, sub-batches interleaved."""
    opts = [engine.resolve(**o) for o in option_sets]
    traces, per_opts, flags = [], [], []
    for k, o in enumerate(opts):
        traces += engine.classify_grouped(list(x), [o] * len(x))
        per_opts += [o] * len(x)
        flags += [(i + k) % 3 != 0 for i in range(len(x))]
    order = np.random.default_rng(0).permutation(len(traces))
    return ([traces[i] for i in order], [per_opts[i] for i in order],
            [flags[i] for i in order])


def test_batched_answers_are_the_per_sample_answers(engine):
    option_sets = [{}, {"coverage": 0.7}, {"coverage": 0.9, "detect": False},
                   {"detect": False}]
    traces, opts, flags = traced(engine, images(), option_sets)
    answers = engine.answers.answers(traces, opts, flags)
    assert {a.detection.detector for a in answers} == {"dynamics-logistic", "off"}
    assert {a.abstained for a in answers} == {True, False}  # both decisions are compared
    assert mismatches(engine, traces, opts, flags) == []
    # the engine's in-process batch path is the same
    x = images()
    o = engine.resolve(coverage=0.7)
    got = [a.model_dump_json() for a in engine.classify(x, o)]
    assert got == [engine.result(t, o, True).model_dump_json() for t in engine.trace(x, o)]


def test_the_comparison_catches_a_batch_row_out_of_place(engine, monkeypatch):
    """A batched path that scores a neighbour's row (logits and features rolled by one) is
    caught: the equality above is not vacuous."""
    traces, opts, flags = traced(engine, images(), [{"coverage": 0.7}])
    stack = attack_detection.stack_traces

    def rolled(ts):
        return stack([*ts[1:], ts[0]])

    monkeypatch.setattr(attack_detection, "stack_traces", rolled)
    monkeypatch.setattr(selective, "stack_traces", rolled)
    bad = mismatches(engine, traces, opts, flags)
    # mean_entropy is scored sample by sample: only the detector's block can move there
    assert len(bad) >= len(traces) // 2


def test_learned_detector_score_does_not_depend_on_the_batch():
    """Each row's log-odds is the same float alone and in any batch, in any order (a matrix
    product's BLAS order depends on the batch's shape and moved the last bit of ~30% of the
    shipped default's scores)."""
    names = ["final_entropy", "max_softmax", "logit_margin", "mean_entropy", "early_entropy",
             "entropy_drop", "early_disagree", "iterations", "converged", "entropy_step_drop"]
    g = torch.Generator().manual_seed(0)
    det = LogisticDetector(features=names, mean=torch.randn(10, generator=g).tolist(),
                           std=(torch.rand(10, generator=g) + 0.1).tolist(),
                           coef=torch.randn(10, generator=g).tolist(), intercept=0.3,
                           threshold=0.0, fpr=0.05)
    feats = {k: torch.randn(257, generator=g, dtype=torch.float64) for k in names}
    whole = det.score(feats)
    rows = torch.cat([det.score({k: v[i:i + 1] for k, v in feats.items()})
                      for i in range(257)])
    assert torch.equal(whole, rows)
    perm = torch.randperm(257, generator=g)
    assert torch.equal(det.score({k: v[perm] for k, v in feats.items()}), whole[perm])


@pytest.mark.skipif(not DEFAULT.exists(), reason="the shipped default checkpoint is absent")
def test_shipped_default_batched_answers_are_the_per_sample_answers():
    engine = TorchEngine.load(str(DEFAULT), device="cpu", threads=1)
    x, _ = make_pattern_images(32, num_classes=4, seed=3)
    x = x.astype(np.float32)
    traces, opts, flags = traced(engine, x, [{}, {"coverage": 0.8}])
    assert all(t.features is not None for t in traces)
    assert mismatches(engine, traces, opts, flags) == []
