"""Which device a `--device` / `device=` setting means: the one place "auto" is decided."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
