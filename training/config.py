"""Typed training configuration, loaded from a preset file and overridden from the command line.

A run is fully described by one `TrainConfig`: the preset gives defaults, `--set a.b=value`
overrides any field (the value is parsed as YAML: numbers, booleans, lists, null), and
`resolve` fills the fields left to the model (training solver) or to the objective (validation
eps), so the metadata and the resume file store every value that was actually used.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..models.config import GradConfig, SolverName
from ..models.errors import DeqguardError
from ..models.registry import PRESETS as MODEL_PRESETS


class ConfigError(DeqguardError):
    """A preset or an override does not make a valid training configuration."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    dataset: Literal["fashion-mnist", "cifar10", "imagefolder"] = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    val_size: int = Field(5000, ge=1, description="images carved from train for validation")
    split_seed: int = 0
    augment: bool = True
    limit: int | None = Field(None, ge=1, description="use the first N training images")
    image_size: int | None = Field(None, ge=8, description="resize an imagefolder")
    pipeline: Literal["auto", "resident", "loader"] = Field(
        "auto", description="resident: the split held on the training device, augmented a "
        "batch at a time (fashion-mnist, cifar10); loader: a DataLoader, image by image; auto: "
        "resident where the dataset allows it")


class ModelSection(_Strict):
    preset: str = "tiny"
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="model config fields, deep-merged over the preset")

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(
                f"unknown model preset {self.preset!r}; known: {sorted(MODEL_PRESETS)}")
        return self


class SolverSection(_Strict):
    """The forward solver used in training forwards; None = the model's own default."""

    solver: SolverName | None = None
    max_iter: int | None = Field(None, ge=1, le=1000)
    tol: float | None = Field(None, gt=0)


class RegulationConfig(_Strict):
    """Paper Sec 3.3: every training forward uses n ~ Uniform{1..solver.max_iter} iterations."""

    enabled: bool = False


SINGLE_STEP_KINDS = ("fgsm-rs", "n-fgsm")  # one attack gradient per step; the overfitting guard


class ObjectiveConfig(_Strict):
    """The training loss. Single-step kinds cost one attack gradient instead of `steps`:

    `fgsm-rs` (Wong, Rice, Kolter 2020): uniform start in the eps-ball, one signed step of
    `step_size` (they use 1.25 eps), projected back to the ball. `n-fgsm` (de Jorge et al. 2022):
    noise U(-noise * eps, noise * eps) (they use 2), one step of `step_size` (they use eps), no
    projection back to the eps-ball, so the example lies within (noise + step/eps) * eps.
    """

    kind: Literal["standard", "pgd-at", "trades", "fgsm-rs", "n-fgsm"] = "pgd-at"
    eps: float = Field(0.1, ge=0)
    step_size: float = Field(0.025, ge=0)
    steps: int = Field(7, ge=0)
    beta: float = Field(6.0, ge=0, description="TRADES weight of the KL term")
    noise: float = Field(2.0, ge=0, description="n-fgsm noise radius, in multiples of eps")
    clean_weight: float = Field(
        0.0, ge=0, le=1, description="pgd-at / fgsm-rs / n-fgsm: loss = (1 - w) CE(x_adv) + "
        "w CE(x), the clean half that keeps clean accuracy up")
    readout: Literal["state", "unrolled"] = "unrolled"
    clean_warmup_steps: int = Field(0, ge=0, description="train on clean CE for the first N steps")


class JacobianConfig(_Strict):
    """Hutchinson estimate of ||J_f(z*)||_F^2 (Bai et al. 2021), paper.md 2.2."""

    weight: float = Field(0.0, ge=0)
    freq: float = Field(0.02, ge=0, le=1, description="probability of adding it at a step")
    stop_epoch: int = Field(90, ge=0, description="off from this epoch on")
    vectors: int = Field(2, ge=1)


ADVERSARIAL_CE_KINDS = ("pgd-at", *SINGLE_STEP_KINDS)  # CE on one adversarial batch


class RectifierTrainConfig(_Strict):
    """Training of the rectifier head (models/rectifier.py, Pang et al. CVPR 2022).

    `weight` > 0 adds weight x BCE(max p x sigmoid(A), stopgrad p_y) on the adversarial batch of
    the CE objectives (pgd-at, fgsm-rs, n-fgsm); the model needs a head
    (`model.overrides.rectifier`). `freeze_backbone` trains the head alone: cheap, and the
    classifier's answers and robustness stay exactly those of the checkpoint it starts from.
    """

    weight: float = Field(0.0, ge=0)
    freeze_backbone: bool = False

    @model_validator(mode="after")
    def _trains_something(self) -> RectifierTrainConfig:
        if self.freeze_backbone and self.weight <= 0:
            raise ValueError("rectifier.freeze_backbone leaves only the head to train: set "
                             "rectifier.weight > 0")
        return self


class OptimConfig(_Strict):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["cosine", "constant", "one-cycle"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)
    warmup_fraction: float = Field(
        0.4, gt=0, lt=1, description="one-cycle: share of the steps spent rising to lr")
    grad_clip: float | None = Field(None, gt=0)


class EvalConfig(_Strict):
    """Validation after every epoch (model selection) and the final test-set check."""

    batch_size: int = Field(256, ge=1)
    val_limit: int | None = Field(1000, ge=1, description="validation images used per epoch")
    eps: float | None = Field(None, ge=0, description="None = objective.eps")
    steps: int = Field(10, ge=0)
    step_size: float | None = Field(None, ge=0, description="None = eps / 4")
    select_by: Literal["pgd", "clean"] = "pgd"
    test_limit: int = Field(1000, ge=1, description="first N test images for test_clean_accuracy")


class RunConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    save_every_steps: int = Field(50, ge=1, description="resume state every N steps")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="off: fp32. bf16: bf16 autocast over fp32 master weights "
        "(parameters, optimizer state and checkpoints stay fp32); on a CPU without AMX-BF16 / "
        "AVX512-BF16 refused, since emulated bf16 is slower than fp32. auto: bf16 on CUDA and "
        "on a CPU with bf16 arithmetic, else fp32 (one line on stderr says why). "
        "DEQGUARD_CPU_BF16=force|off overrides the CPU detection (tests, benchmarks)")
    channels_last: bool = Field(
        False, description="model and 4-D input batches in channels_last memory format (can "
        "speed up convolutions on CPUs with oneDNN bf16 kernels and on GPUs)")
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="keep an exponential moving average of the weights beside "
        "the run with this decay per step (0: none; 0.999 is typical): validated every epoch, "
        "saved as ema.safetensors and ema_best.safetensors; it never changes the run's own "
        "weights (training/weight_average.py)")
    cuda_graphs: bool = Field(
        False, description="on CUDA: replay each solver depth's training forward as captured "
        "CUDA graphs (training/graphs.py), for a GPU whose step is launch-bound; the same "
        "numbers as without. Ignored on a CPU")
    deterministic: bool = True
    progress: bool = True
    init_from: str | None = Field(
        None, description="start from this checkpoint's weights (path, shipped name or store "
        "tag) instead of a fresh init; its provenance goes into the metadata")
    overfit_guard: bool = Field(
        True, description="stop and restore the best epoch on catastrophic overfitting")
    overfit_drop: float = Field(
        0.2, gt=0, le=1, description="guard: validation PGD accuracy this far (absolute) under "
        "its best while the training attack's accuracy rises")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` as false: `--set train.amp=off` must still mean off."""
        return "off" if value is False else value


class TrainConfig(_Strict):
    name: str
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    solver: SolverSection = SolverSection()
    grad: GradConfig = GradConfig()
    regulation: RegulationConfig = RegulationConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    jacobian: JacobianConfig = JacobianConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    train: RunConfig = RunConfig()
    rectifier: RectifierTrainConfig = RectifierTrainConfig()

    @model_validator(mode="after")
    def _rectifier_objective(self) -> TrainConfig:
        kind = self.objective.kind
        if self.rectifier.weight > 0 and kind not in ADVERSARIAL_CE_KINDS:
            raise ValueError(f"rectifier.weight > 0 trains on the adversarial batch of "
                             f"{', '.join(ADVERSARIAL_CE_KINDS)}; objective.kind is {kind!r}")
        return self


# Fields that may differ between a run and its resumption: they do not change the computation
# (the device and the memory format change which kernels run, and so the last bits, not the
# arithmetic; each invocation's choice is in `training.segments`).
RESUME_FREE_FIELDS = frozenset({"data.data_dir", "data.download", "train.num_workers",
                                "train.device", "train.progress", "train.cuda_graphs",
                                "train.ema_decay", "train.channels_last"})
# Fields added after resume states may have been written: a saved config without one of them
# ran with the value given here, so resuming such a run under that value is no difference.
# (A run saved before `data.pipeline` read its batches through the DataLoader.)
ADDED_FIELDS: dict[str, Any] = {"data.pipeline": "loader", "rectifier.weight": 0.0,
                                "rectifier.freeze_backbone": False}


# -- presets ---------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    folder = resources.files("deqguard.training.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's raw dict: a shipped name (see `preset_names`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        res = resources.files("deqguard.training.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; shipped presets: "
                              f"{', '.join(preset_names())} (or give a path to a .yaml file)")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {name_or_path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name_or_path!r} must be a YAML mapping")
    data.setdefault("name", path.stem if path.suffix else name_or_path)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def build_config(preset: str, overrides: list[str] | None = None) -> TrainConfig:
    """The validated config of a preset with `section.field=value` overrides applied."""
    data = apply_overrides(load_preset(preset), overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid training config (preset {preset!r}):\n{exc}") from None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if nested else v
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any],
                       ignore: frozenset[str] = RESUME_FREE_FIELDS) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring `ignore`)."""
    fa, fb = ({**ADDED_FIELDS, **flatten(c)} for c in (a, b))
    keys = sorted(set(fa) | set(fb))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys
            if k not in ignore and fa.get(k) != fb.get(k)]


def resolve(cfg: TrainConfig, model_solver: Any | None) -> TrainConfig:
    """Fill fields left to defaults: training solver from the model, eval eps from the objective.

    `model_solver` is the model's SolverConfig (None for feedforward models).
    """
    solver = cfg.solver
    if model_solver is not None:
        solver = SolverSection(
            solver=solver.solver or model_solver.solver,
            max_iter=solver.max_iter or model_solver.max_iter,
            tol=solver.tol or model_solver.tol)
    eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.objective.eps
    step = cfg.eval.step_size if cfg.eval.step_size is not None else eps / 4
    ev = cfg.eval.model_copy(update={"eps": eps, "step_size": step})
    return cfg.model_copy(update={"solver": solver, "eval": ev})
