"""The resume state of a training run: weights, optimizer, scheduler, position, epoch tallies.

Written atomically every few steps and at the end of every epoch, so that a run killed at any
moment (SIGKILL included) continues from the last save. No RNG state is stored because none is
needed: every random draw of a step (data order, augmentation, attack noise, solver depth,
dropout) is derived from (seed, epoch, step, rank), so resuming at step s replays exactly the
draws an uninterrupted run makes at step s.

This file is the one place a torch pickle is used (`torch.save`), and it is read back with
`weights_only=True`; shipped checkpoints are safetensors (deqguard.models.checkpoint).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from deqguard.fileio import atomic_open

from ..models.errors import DeqguardError
from .config import config_differences

RESUME_FORMAT = "deqguard-resume"
RESUME_VERSION = 1
RESUME_FILE = "resume.pt"


class ResumeError(DeqguardError):
    """A resume file is unreadable, from another format, or from a different run."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_open(path) as fh:
        torch.save({"format": RESUME_FORMAT, "version": RESUME_VERSION, **state}, fh)


def load_state(path: Path, *, config: dict[str, Any], data_fingerprint: str,
               world_size: int) -> dict[str, Any]:
    """Read and check a resume file against the run that wants to continue it."""
    hint = f"delete {path} (and its folder's checkpoints) to start over, or drop --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"no resume file at {path}") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise ResumeError(f"resume file {path} is corrupt or truncated ({exc}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{path} is not a deqguard resume file; {hint}")
    if state.get("version") != RESUME_VERSION:
        raise ResumeError(f"{path}: resume format version {state.get('version')!r}, this "
                          f"deqguard reads version {RESUME_VERSION}; {hint}")
    missing = [k for k in ("config", "epoch", "step", "model", "optimizer", "scheduler")
               if k not in state]
    if missing:
        raise ResumeError(f"{path} lacks {missing}: corrupt resume file; {hint}")
    diffs = config_differences(state["config"], config)
    if diffs:
        raise ResumeError(f"{path} belongs to a run with a different configuration "
                          f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); "
                          "resume with the same preset and overrides, or use another --out")
    if state.get("data_fingerprint") != data_fingerprint:
        raise ResumeError(f"{path} was trained on different data (fingerprint "
                          f"{str(state.get('data_fingerprint'))[:12]}..., now "
                          f"{data_fingerprint[:12]}...); {hint}")
    if state.get("world_size", 1) != world_size:
        raise ResumeError(f"{path} was written by a run with {state.get('world_size')} "
                          f"processes, this one has {world_size}: the batch order would differ")
    return state
