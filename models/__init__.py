"""DEQ architectures, fixed-point solvers with trajectories, and safetensors checkpoints.

    from deqguard.models import build_model, list_models
    list_models()                                       # the registered names
    model = build_model("tiny", num_classes=10, in_channels=1, image_size=28).eval()
    logits = model(x)                                   # attack libraries wrap this
    result = model.solve(x, solver="anderson", max_iter=30, tol=1e-3)
    result.entropy, result.residual, result.iterations, result.converged

The names below load on first use (PEP 562), not when the package is imported: every
`deqguard.models.*` module imports this package first, and the torch-free ones (`config`,
`errors`, the command-line parts) must stay torch-free, so `deqguard --help` does not pay for
loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers, editors and the import-graph test read
    from .checkpoint import (
        CheckpointMetadata,
        InputSpec,
        load_checkpoint,
        read_metadata,
        resolve_checkpoint,
        save_checkpoint,
        update_metadata,
    )
    from .classifier import Classifier, DEQClassifier, Equilibrium, SolveResult
    from .config import DEQConfig, GradConfig, ModelConfig, SolverConfig
    from .entropy import prediction_entropy
    from .errors import CheckpointError, DeqguardError, InputError
    from .feedforward import CNNConfig, ResNetConfig
    from .mdeq import MDEQConfig
    from .registry import (
        PRESETS,
        build_model,
        get_model,
        list_models,
        parse_model_config,
        register_model,
        resolve_config,
    )
    from .solvers import get_solver, register_solver, solver_names
    from .tiny import TinyDEQConfig
    from .wk_small import WKSmallCNNConfig, WKSmallDEQConfig

# public name -> the submodule that defines it (the registry imports every built-in
# architecture, so any name read from it sees them all registered)
_EXPORTS = {
    "CheckpointMetadata": "checkpoint", "InputSpec": "checkpoint",
    "load_checkpoint": "checkpoint", "read_metadata": "checkpoint",
    "resolve_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "update_metadata": "checkpoint",
    "Classifier": "classifier", "DEQClassifier": "classifier", "Equilibrium": "classifier",
    "SolveResult": "classifier",
    "DEQConfig": "config", "GradConfig": "config", "ModelConfig": "config",
    "SolverConfig": "config",
    "prediction_entropy": "entropy",
    "CheckpointError": "errors", "DeqguardError": "errors", "InputError": "errors",
    "CNNConfig": "feedforward", "ResNetConfig": "feedforward", "MDEQConfig": "mdeq",
    "TinyDEQConfig": "tiny", "WKSmallCNNConfig": "wk_small", "WKSmallDEQConfig": "wk_small",
    "PRESETS": "registry", "build_model": "registry", "get_model": "registry",
    "list_models": "registry", "parse_model_config": "registry", "register_model": "registry",
    "resolve_config": "registry",
    "get_solver": "solvers", "register_solver": "solvers", "solver_names": "solvers",
}

__all__ = [
    "PRESETS", "CNNConfig", "CheckpointError", "CheckpointMetadata", "Classifier",
    "DEQClassifier", "DEQConfig", "DeqguardError", "Equilibrium", "GradConfig", "InputError",
    "InputSpec", "MDEQConfig", "ModelConfig", "ResNetConfig", "SolveResult", "SolverConfig",
    "TinyDEQConfig", "WKSmallCNNConfig", "WKSmallDEQConfig", "build_model", "get_model",
    "get_solver", "list_models", "load_checkpoint", "parse_model_config", "prediction_entropy",
    "read_metadata", "register_model", "register_solver", "resolve_checkpoint",
    "resolve_config", "save_checkpoint", "solver_names", "update_metadata",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
