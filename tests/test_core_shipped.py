"""The checkpoints in the repository load unchanged: the same config, the same logits.

`data/shipped_logits.json` holds each checkpoint's logits as computed by the code that trained it,
on a fixed input (`torch.rand` from a seeded generator: the same numbers on every CPU). Renaming an
architecture, parsing configs another way or changing a default must leave them as they were.
Regenerate the file only when a checkpoint itself is replaced: `python tests/test_core_shipped.py`
(it rewrites every entry; check with `git diff` that only the replaced ones moved).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deqguard.models import load_checkpoint, parse_model_config, read_metadata, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("data") / "shipped_logits.json"
CHECKPOINTS = [
    "models/weights/default.safetensors",
    "models/weights/regulated-e15.safetensors",
    "runs/long/fashion-cnn-wk/best.safetensors",
    "runs/long/fashion-wk-plain/best.safetensors",
    "runs/long/fashion-wk-regulated/best.safetensors",
]


def fixed_input() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def logits_of(rel: str) -> dict[str, torch.Tensor]:
    """The model's own forward (its stored solver settings), and its logits at the fixed point
    (solved far past the stored tolerance: independent of where a CPU's rounding stops it)."""
    model, _ = load_checkpoint(ROOT / rel, device="cpu")
    x = fixed_input()
    with torch.no_grad():
        default = model(x)
        converged = model(x, tol=1e-6, max_iter=100) if model.is_deq else default
    return {"default": default, "converged": converged}


@pytest.mark.parametrize("rel", CHECKPOINTS)
def test_stored_config_parses_to_itself(rel):
    meta = read_metadata(ROOT / rel)
    assert parse_model_config(meta.model).model_dump(mode="json") == meta.model


@pytest.mark.parametrize("rel", CHECKPOINTS)
def test_logits_are_those_it_was_trained_to_give(rel):
    want = {k: torch.tensor(v) for k, v in json.loads(GOLDEN.read_text())[rel].items()}
    got = logits_of(rel)
    torch.testing.assert_close(got["converged"], want["converged"], rtol=1e-4, atol=1e-4)
    # The stored stopping rule (tol 1e-3) may end one iteration earlier or later on another CPU,
    # which moves a logit by a few 1e-3; a wrong solver setting or layer moves it by far more.
    torch.testing.assert_close(got["default"], want["default"], rtol=0, atol=2e-2)
    assert torch.equal(got["default"].argmax(1), want["default"].argmax(1))


def test_the_previous_default_is_still_shipped_by_name():
    """A caller who needs the answers served before the 2026-12-05 switch serves `regulated-e15`:
    the same weights, calibrations and all, that `default` named until then."""
    meta = read_metadata(resolve_checkpoint("regulated-e15"))
    assert meta.sha256.startswith("f13d103ccbf39a35")
    assert meta.detection is not None and "detector" in meta.model_extra
    assert "selective" in meta.model_extra
    assert read_metadata(resolve_checkpoint("default")).sha256 != meta.sha256


if __name__ == "__main__":
    table = {rel: {k: v.tolist() for k, v in logits_of(rel).items()} for rel in CHECKPOINTS}
    GOLDEN.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
