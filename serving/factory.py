"""The engine the server settings ask for: torch or ONNX.

The one place that knows both backends. `engine.py` defines `ModelEngine`, `torch_engine.py` and
`onnx_engine.py` build on it, and this module picks between them, so the base module never
imports a backend built on it.
"""

from __future__ import annotations

from typing import Any

from .engine import ModelEngine


def load_engine(settings: Any) -> ModelEngine:
    """The engine `settings` (serving.settings.ServerSettings) ask for."""
    engine: ModelEngine
    if settings.backend == "onnx":
        from .onnx_engine import OnnxEngine

        engine = OnnxEngine.from_settings(settings)
    else:
        from .torch_engine import TorchEngine

        engine = TorchEngine.load(settings.checkpoint, device=settings.device,
                                  threads=settings.threads, max_iter_cap=settings.max_iter_cap)
    engine.pair_singles = settings.batch_invariant
    engine.request_budget_ms = settings.request_budget_ms
    return engine
