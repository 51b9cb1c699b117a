"""Which device a `--device` / `device=` setting means: the one place "auto" is decided."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matrix products inside, restored after.

    A GPU's default TF32 rounds operands to 10 mantissa bits, close to the solvers' 1e-3
    tolerance, so a solve whose convergence is being measured runs in full fp32. Nothing
    changes on a CPU, which has no TF32.
    """
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved["cudnn"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul"]


def tf32_flags() -> dict[str, bool]:
    """Whether convolutions (cuDNN) and matrix products may round to TF32 on a GPU now."""
    return {"cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32}


def cpuinfo_field(keys: tuple[str, ...],
                  path: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The first processor's value of the first of `keys` in /proc/cpuinfo (Linux), else None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return None


def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name: the same command is not the same run on another chip."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpuinfo_field(("model name",)) or platform.processor() or platform.machine()
