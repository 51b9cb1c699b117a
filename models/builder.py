"""Build any deqguard model from a preset name or a config (the torchvision-style entry point)."""

from __future__ import annotations

from typing import Any

from .classifier import Classifier
from .config import (
    PRESETS,
    AnchorCNNConfig,
    AnchorDEQConfig,
    CNNConfig,
    MDEQConfig,
    ModelConfig,
    ResNetConfig,
    TinyDEQConfig,
)


def resolve_config(preset_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A config from a preset name or config, with the given fields replaced (None = keep)."""
    if isinstance(preset_or_config, str):
        try:
            cfg = PRESETS[preset_or_config]
        except KeyError:
            raise ValueError(
                f"unknown model preset {preset_or_config!r}; known: {sorted(PRESETS)}") from None
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
    if isinstance(cfg, TinyDEQConfig):
        from .tiny import TinyDEQ
        return TinyDEQ(cfg)
    if isinstance(cfg, MDEQConfig):
        from .mdeq import MDEQ
        return MDEQ(cfg)
    if isinstance(cfg, AnchorDEQConfig):
        from .anchor import AnchorDEQ
        return AnchorDEQ(cfg)
    if isinstance(cfg, AnchorCNNConfig):
        from .anchor import AnchorCNN
        return AnchorCNN(cfg)
    if isinstance(cfg, CNNConfig):
        from .feedforward import SmallCNN
        return SmallCNN(cfg)
    if isinstance(cfg, ResNetConfig):
        from .feedforward import ResNet18
        return ResNet18(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")
