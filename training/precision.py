"""Which precision a training run computes in: fp32, or bf16 autocast over fp32 master weights.

bf16 autocast pays off only where the hardware has bf16 arithmetic: CUDA, or a CPU with AMX-BF16
(Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4 and later). On any other CPU torch
still runs autocast, converting to bf16 and back around fp32 kernels: slower than fp32 and less
accurate, so a run asked for bf16 there is refused and `train.amp=auto` falls back to fp32.

The detection can be overridden with the environment variable `DEQGUARD_CPU_BF16`: `force`
treats the CPU as supported (emulated bf16: for tests and benchmarks of the bf16 path on any
machine, slow), `off` as unsupported, `auto` or unset detects. It is read on every call so that
tests can set it with monkeypatch and subprocesses inherit it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from ..models.device import cpuinfo_field
from ..models.errors import DeqguardError

ENV = "DEQGUARD_CPU_BF16"
AmpMode = Literal["auto", "bf16", "off"]
NO_BF16 = "this CPU has no AMX / AVX512-BF16"
_FLAGS = ("amx_bf16", "avx512_bf16")  # names in torch's capability map and in /proc/cpuinfo


def _torch_capabilities() -> dict[str, object] | None:
    """The CPU feature map of torch >= 2.14 (`torch.cpu.get_capabilities`), else None."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return None
    try:
        return dict(get())
    except (RuntimeError, AttributeError):
        return None


def _torch_probes() -> bool | None:
    """Older torch (2.11 to 2.13): its private per-feature probes, else None."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(p) for p in probes):
        return None
    try:
        # AMX-BF16 comes with AMX-TILE on every CPU that has it (Intel's AMX launch set)
        return any(bool(p()) for p in probes)
    except (RuntimeError, AttributeError):
        return None


def _cpuinfo_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str] | None:
    """The flags of the first processor listed in /proc/cpuinfo (Linux), else None."""
    value = cpuinfo_field(("flags", "Features"), path)
    return None if value is None else set(value.split())


@lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX-BF16 or AVX512-BF16), detected at run time.

    Torch's own detection first (cpuinfo, the same the kernels dispatch on), then
    /proc/cpuinfo. Ignores `DEQGUARD_CPU_BF16`; see `cpu_bf16_supported` for the override.
    """
    caps = _torch_capabilities()
    if caps is not None and any(f in caps for f in _FLAGS):
        return any(bool(caps.get(f, False)) for f in _FLAGS)
    probed = _torch_probes()
    if probed is not None:
        return probed
    flags = _cpuinfo_flags()
    return flags is not None and any(f in flags for f in _FLAGS)


def cpu_bf16_override() -> Literal["force", "off"] | None:
    """`DEQGUARD_CPU_BF16` as set (force / off), None when unset or `auto`."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("force", "off"):
        return raw  # type: ignore[return-value]
    raise DeqguardError(f"{ENV}={raw!r}: expected force, off or auto")


def cpu_bf16_supported() -> bool:
    """Whether CPU training may use bf16: the detection, unless `DEQGUARD_CPU_BF16` overrides it.
    """
    override = cpu_bf16_override()
    if override is not None:
        return override == "force"
    return cpu_native_bf16()


@dataclass(frozen=True)
class Precision:
    """What a run computes in. `bf16`: autocast to bf16 (parameters, gradients and optimizer
    state stay fp32); `emulated`: bf16 on a CPU without bf16 arithmetic (forced); `note`: one
    line saying why, worth printing (fp32 fallback, emulation), else None."""

    bf16: bool
    emulated: bool = False
    note: str | None = None

    @property
    def label(self) -> str:
        return "bf16-emulated" if self.emulated else "bf16" if self.bf16 else "fp32"


def choose_precision(amp: AmpMode, device_type: str, *, emulate: bool = False) -> Precision:
    """The precision of `train.amp` on this device.

    off: fp32. bf16: bf16 autocast; refused on a CPU without bf16 arithmetic (DeqguardError),
    since it would be slower than fp32 there. auto: bf16 on CUDA and on a CPU with bf16
    arithmetic, else fp32 with a note. `emulate=True` (benchmarks) times bf16 on any CPU, as
    `DEQGUARD_CPU_BF16=force` would.
    """
    if amp == "off":
        return Precision(False)
    if device_type != "cpu":
        return Precision(True)  # CUDA has bf16 arithmetic (the config allows no other device)
    native, override = cpu_native_bf16(), cpu_bf16_override()
    if emulate or cpu_bf16_supported():
        if native:
            return Precision(True)
        why = f"{ENV}=force" if override == "force" else "benchmark"
        return Precision(True, emulated=True,
                         note=f"{NO_BF16}; bf16 autocast emulated ({why}), slower than fp32")
    why = NO_BF16 + (f" ({ENV}=off)" if override == "off" else "")
    if amp == "bf16":
        raise DeqguardError(f"train.amp=bf16: {why}, so bf16 would only be emulated (slower "
                            "than fp32); use train.amp=auto (fp32 here) or train.amp=off")
    return Precision(False, note=f"{why}; training in fp32")
