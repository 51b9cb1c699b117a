"""The model registry: each architecture registers itself where it is defined.

    @register_model("tiny-deq", TinyDEQConfig, presets={"tiny": TinyDEQConfig()})
    class TinyDEQ(StemCellDEQ): ...

    list_models()                         # every name build_model accepts
    model = get_model("tiny", num_classes=4)
    model = build_model(config)           # a config object, e.g. from checkpoint metadata

Adding an architecture is one module holding its config and network, decorated as above, and
its name in `_BUILTIN_MODULES` below (importing it runs the decorator). The registered name is the
config's `arch`, the key checkpoint metadata stores, so a checkpoint is rebuilt through the same
table a preset name is. Each architecture's name builds its default config; `presets` adds named
variants (`large`, `xl`). In the style of torchvision.models' register_model / get_model /
list_models.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .classifier import Classifier
from .config import ModelConfig

M = TypeVar("M", bound=type[Classifier])


@dataclass(frozen=True)
class Architecture:
    """A registered network: its config class and the classifier built from that config."""

    name: str
    config: type[ModelConfig]
    model: type[Classifier]


_ARCHITECTURES: dict[str, Architecture] = {}
_PRESETS: dict[str, ModelConfig] = {}
# The modules whose architectures register themselves when imported. They import this module
# for the decorator, so they are loaded on the first use of the registry, not at its import:
# whoever reads the registry sees them all, however `deqguard.models` was entered.
_BUILTIN_MODULES = ("feedforward", "mdeq", "tiny", "wk_small")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # first: their decorators come back through register()
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")


class _Presets(Mapping[str, ModelConfig]):
    """A read-only view of the registered names that loads the built-ins first."""

    def __getitem__(self, name: str) -> ModelConfig:
        _load_builtins()
        return _PRESETS[name]

    def __iter__(self) -> Iterator[str]:
        _load_builtins()
        return iter(dict(_PRESETS))

    def __len__(self) -> int:
        _load_builtins()
        return len(_PRESETS)


PRESETS: Mapping[str, ModelConfig] = _Presets()
"""Every name `build_model` accepts and the config it starts from (read-only)."""


def register_model(name: str, config: type[ModelConfig], *,
                   presets: Mapping[str, ModelConfig] | None = None) -> Callable[[M], M]:
    """Class decorator: register a classifier under `name`, built from `config` objects.

    `name` must be the config's `arch` (what checkpoints store). A name already taken, by an
    architecture or a preset, is refused: a second registration would silently change what
    existing checkpoints and presets build.
    """
    arch_field = config.model_fields.get("arch")
    if arch_field is None or arch_field.default != name:
        raise ValueError(f"{config.__name__}.arch must default to {name!r} to be registered "
                         f"under that name (it is {getattr(arch_field, 'default', None)!r})")
    named = {name: config(), **dict(presets or {})}
    for key, cfg in named.items():
        if not isinstance(cfg, config):
            raise TypeError(f"preset {key!r} is a {type(cfg).__name__}, not a {config.__name__}")

    def register(model: M) -> M:
        _load_builtins()  # a new name is checked against the built-in ones too
        taken = sorted(k for k in named if k in _PRESETS)
        if taken:
            raise ValueError(f"cannot register {model.__name__}: model name(s) "
                             f"{', '.join(taken)} already registered")
        _ARCHITECTURES[name] = Architecture(name, config, model)
        _PRESETS.update(named)
        return model

    return register


def list_models() -> list[str]:
    """Every registered name, sorted: the architectures and their presets."""
    _load_builtins()
    return sorted(_PRESETS)


def _unknown(kind: str, name: object, known: list[str]) -> ValueError:
    return ValueError(f"unknown model {kind} {name!r}; known: {', '.join(known)}")


def parse_model_config(data: Mapping[str, Any] | str) -> ModelConfig:
    """Rebuild a model config from its JSON form (as stored in checkpoint metadata)."""
    raw = json.loads(data) if isinstance(data, str) else data
    if not isinstance(raw, Mapping):
        raise ValueError(f"a model config is a JSON object, got {type(raw).__name__}")
    arch = raw.get("arch")
    _load_builtins()
    if arch not in _ARCHITECTURES:
        raise _unknown("architecture", arch, sorted(_ARCHITECTURES))
    return _ARCHITECTURES[arch].config.model_validate(raw)


def resolve_config(preset_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A config from a registered name or a config, with the given fields replaced (None =
    keep)."""
    if isinstance(preset_or_config, str):
        try:
            cfg = PRESETS[preset_or_config]
        except KeyError:
            raise _unknown("preset", preset_or_config, list_models()) from None
    else:
        cfg = preset_or_config
    updates = {k: v for k, v in overrides.items() if v is not None}
    if updates:
        cfg = type(cfg).model_validate({**cfg.model_dump(), **updates})
    return cfg


def build_model(preset_or_config: str | ModelConfig, *, num_classes: int | None = None,
                in_channels: int | None = None, image_size: int | None = None,
                **overrides: Any) -> Classifier:
    """An initialised classifier: `model(x)` gives logits, `model.solve(x)` the trajectory."""
    cfg = resolve_config(preset_or_config, num_classes=num_classes, in_channels=in_channels,
                         image_size=image_size, **overrides)
    _load_builtins()
    entry = _ARCHITECTURES.get(cfg.arch)
    if entry is None or not isinstance(cfg, entry.config):
        raise TypeError(f"{type(cfg).__name__} (arch {cfg.arch!r}) is not a registered model "
                        f"config; registered: {', '.join(sorted(_ARCHITECTURES))}")
    model = entry.model(cfg)
    if getattr(cfg, "rectifier", None) is not None:
        model.attach_rectifier()
    return model


def get_model(name: str, **config: Any) -> Classifier:
    """`build_model(name, **config)` under torchvision.models.get_model's name, for code and
    readers that know that one."""
    return build_model(name, **config)

