"""Which device a `--device` / `device=` setting means: the one place "auto" is decided."""

from __future__ import annotations

import torch

from .errors import DeqguardError


def resolve_device(device: str | None = "auto") -> str:
    """"cuda" or "cpu" for a setting: "auto" (or None) takes CUDA when torch sees it.

    Asking for CUDA where torch sees none is a DeqguardError naming the setting, not the
    traceback a tensor move would raise later.
    """
    name = device or "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeqguardError("device cuda was asked for but torch sees no CUDA device")
    return name
