"""The engine the server settings ask for: torch or ONNX.

The one place that knows both backends. `engine.py` defines `Engine` and the torch backend,
`onnx_engine.py` builds on `engine.py`, and this module picks between them, so the base module
never imports a backend built on it.
"""

from __future__ import annotations

from typing import Any

from .engine import Engine, TorchEngine


def load_engine(settings: Any) -> Engine:
    """The engine `settings` (serving.settings.ServerSettings) ask for."""
    if settings.backend == "onnx":
        from .onnx_engine import OnnxEngine

        engine: Engine = OnnxEngine.from_settings(settings)
    else:
        engine = TorchEngine.load(settings.checkpoint, device=settings.device,
                                  threads=settings.threads, max_iter_cap=settings.max_iter_cap)
    engine.pair_singles = settings.batch_invariant
    return engine
