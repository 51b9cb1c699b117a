"""DEQ architectures, fixed-point solvers with trajectories, and safetensors checkpoints.

    from deqguard.models import build_model
    model = build_model("tiny", num_classes=10, in_channels=1, image_size=28).eval()
    logits = model(x)                                   # attack libraries wrap this
    result = model.solve(x, solver="anderson", max_iter=30, tol=1e-3)
    result.entropy, result.residual, result.iterations, result.converged
"""

from .builder import build_model, resolve_config
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
from .config import (
    PRESETS,
    AnchorCNNConfig,
    AnchorDEQConfig,
    CNNConfig,
    GradConfig,
    MDEQConfig,
    ResNetConfig,
    SolverConfig,
    TinyDEQConfig,
    parse_model_config,
)
from .entropy import prediction_entropy
from .errors import CheckpointError, DeqguardError, InputError
from .solvers import get_solver, register_solver, solver_names

__all__ = [
    "PRESETS", "AnchorCNNConfig", "AnchorDEQConfig", "CNNConfig", "CheckpointError",
    "CheckpointMetadata", "Classifier",
    "DEQClassifier", "DeqguardError", "Equilibrium", "GradConfig", "InputError", "InputSpec",
    "MDEQConfig", "ResNetConfig", "SolveResult", "SolverConfig", "TinyDEQConfig", "build_model",
    "get_solver", "load_checkpoint", "parse_model_config", "prediction_entropy", "read_metadata",
    "register_solver", "resolve_checkpoint", "resolve_config", "save_checkpoint",
    "solver_names", "update_metadata",
]
