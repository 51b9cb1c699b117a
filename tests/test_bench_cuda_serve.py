"""bench/cuda_serve.py: the serving benchmark runs on whatever device there is (the CPU here, the
graph row then n/a), and its fixed-iteration block is the ONNX export's computation, equal to the
naive solve at the same iterations. The CUDA-graph test runs where a GPU is."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_bench

from deqguard.models import load_checkpoint


@pytest.fixture(scope="module")
def cuda_serve():
    return load_bench("cuda_serve.py")


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _naive(model, x: torch.Tensor, iterations: int) -> torch.Tensor:
    with torch.no_grad():
        return model.solve(x, solver="naive", max_iter=iterations, tol=1e-12, trajectory=False,
                           reference=True).logits


def test_bench_runs_on_the_cpu_and_reports_the_graph_as_na(cuda_serve, tiny_checkpoint,
                                                           tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = cuda_serve.main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--runs", "3",
                          "--repeats", "1", "--batches", "6", "3", "--iterations", "7",
                          "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["iterations"] == 7
    assert r["latency_batch1"]["fixed_graph"] == cuda_serve.NO_CUDA
    for row in ("engine", "fixed_eager"):
        assert r["latency_batch1"][row]["runs"] == 3
        assert 0 < r["latency_batch1"][row]["p50_ms"] <= r["latency_batch1"][row]["p99_ms"]
    assert set(r["images_per_second"]) == {"6", "3"}
    for row in r["images_per_second"].values():
        assert row["engine"] > 0 and row["fixed_eager"] > 0
        assert row["fixed_graph"] == cuda_serve.NO_CUDA
    c = r["checks"]
    assert c["ok"] and c["atol"] == 1e-5
    assert set(c["max_abs_diff"]) == {"eager_vs_onnx_module", "eager_vs_naive_solve"}
    assert max(c["max_abs_diff"].values()) <= 1e-5
    assert "| fixed graph | n/a (no CUDA) |" in printed and "-> ok" in printed
    conv = r["engine_convergence"]
    assert conv["default_precision"] == conv["fp32"]  # no TF32 on a CPU: the same solve
    assert conv["fp32"]["images"] == 6 and 1 <= conv["fp32"]["mean_iterations"] <= 30
    assert 0 <= conv["fp32"]["converged_fraction"] <= 1
    assert "served solve on the benchmark's images: default precision " in printed


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_fixed_block_is_the_naive_solve_at_the_same_iterations(cuda_serve, tiny_checkpoint,
                                                               damping):
    model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    solver = model.config.solver.model_copy(update={"damping": damping})
    model.config = model.config.model_copy(update={"solver": solver})
    block, unrolled = cuda_serve.fixed_block(str(tiny_checkpoint), 9, "cpu")
    block.damping = unrolled.damping = damping
    x = _x(5)
    with torch.no_grad():
        eager = block(x)
        exported = unrolled(x)[0]
    assert (eager - _naive(model, x, 9)).abs().max() <= 1e-5
    assert (eager - exported).abs().max() <= 1e-5
    # the comparison can fail: one iteration fewer is another answer
    assert (eager - _naive(model, x, 8)).abs().max() > 1e-5


def test_checks_report_a_block_that_differs(cuda_serve, tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    block, unrolled = cuda_serve.fixed_block(str(tiny_checkpoint), 6, "cpu")
    diffs = cuda_serve.checks(model, block, unrolled, _x(4).numpy(), "cpu", 6)
    assert max(diffs.values()) <= 1e-5
    block.steps = 5  # no longer what the export and the solve compute
    diffs = cuda_serve.checks(model, block, unrolled, _x(4).numpy(), "cpu", 6)
    assert min(diffs.values()) > 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_cuda_graph_replays_the_eager_block(cuda_serve, tiny_checkpoint):
    block, _ = cuda_serve.fixed_block(str(tiny_checkpoint), 12, "cuda")
    graph = cuda_serve.GraphedBlock(block, (4, 1, 28, 28), "cuda")
    for seed in (1, 2):  # a second input: the static buffers take new data
        x = _x(4, seed).cuda()
        with torch.no_grad():
            eager = block(x)
        replayed = graph(x).clone()
        assert (replayed - eager).abs().max() <= 1e-5
    assert (replayed - graph(_x(4, 1).cuda())).abs().max() > 0
