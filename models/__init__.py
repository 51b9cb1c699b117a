"""DEQ architectures, fixed-point solvers with trajectories, and safetensors checkpoints.

    from deqguard.models import build_model, list_models
    list_models()                                       # the registered names
    model = build_model("tiny", num_classes=10, in_channels=1, image_size=28).eval()
    logits = model(x)                                   # attack libraries wrap this
    result = model.solve(x, solver="anderson", max_iter=30, tol=1e-3)
    result.entropy, result.residual, result.iterations, result.converged
"""

# Each architecture registers itself (models/registry.py) when its module is imported: these
# imports fill the registry before anything can ask it for a model.
from . import feedforward, mdeq, tiny, wk_small  # noqa: F401
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

__all__ = [
    "PRESETS", "CNNConfig", "CheckpointError", "CheckpointMetadata", "Classifier",
    "DEQClassifier", "DEQConfig", "DeqguardError", "Equilibrium", "GradConfig", "InputError",
    "InputSpec", "MDEQConfig", "ModelConfig", "ResNetConfig", "SolveResult", "SolverConfig",
    "TinyDEQConfig", "WKSmallCNNConfig", "WKSmallDEQConfig", "build_model", "get_model",
    "get_solver", "list_models", "load_checkpoint", "parse_model_config", "prediction_entropy",
    "read_metadata", "register_model", "register_solver", "resolve_checkpoint",
    "resolve_config", "save_checkpoint", "solver_names", "update_metadata",
]
