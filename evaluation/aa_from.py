"""Later AutoAttack stages on top of an earlier report's (`deqguard eval --aa-from REPORT`).

AutoAttack runs its attacks one after another, each from the clean images, on the images every
earlier attack left robust, each with its own seed. So "APGD-CE + APGD-T, then Square" is the
APGD report's per-image outcomes plus Square on the images they left: rerunning the two APGD
stages (70 minutes on the wide DEQ's first 1,000 test images on this 2-core machine) would buy
nothing. The earlier report must have scored the same checkpoint on these images (or on a range
holding them, so that a long last stage can run in parts that `deqguard eval-merge` joins) with
the same AutoAttack settings, and its stages must begin the requested ones; anything else is
refused before an image is attacked, because the stages would no longer compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import Tensor

from deqguard.models.errors import DeqguardError

from .autoattack import STANDARD_ATTACKS, runs_first, stages_of
from .per_sample import image_range, unbits
from .schema import EvalReport, EvalSettings

# settings that change what the earlier stages computed; each must match
SAME_SETTINGS = ("data", "split", "eps", "defense", "defense_config", "aa_version",
                 "aa_gradient", "seed")


@dataclass
class EarlierStages:
    """The AutoAttack stages an earlier report ran on these images, in run order."""

    report: str
    created: str
    correct_after: dict[str, Tensor]  # "clean", then each stage: [n] bool, still right
    seconds: dict[str, float]
    warnings: list[str]

    @property
    def stages(self) -> list[str]:
        return stages_of(self.correct_after)


def earlier_stages(path: str, settings: EvalSettings, sha256: str, n: int) -> EarlierStages:
    """The stages of `path` that `settings` (scoring `n` images with AutoAttack from image
    settings.start + 1, on the checkpoint of hash `sha256`) continues, cut to those images; a
    clear error for every reason they would not compose."""
    try:
        earlier = EvalReport.model_validate_json(Path(path).read_text())
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise DeqguardError(f"--aa-from {path}: not a readable deqguard eval report ({first})"
                            ) from None
    aa = earlier.autoattack
    if aa is None or aa.correct_after is None:
        raise DeqguardError(f"--aa-from {path}: it ran no AutoAttack, or kept no per-image "
                            "outcomes of it (reports before correct_after was recorded)")
    if earlier.checkpoint.sha256 != sha256:
        raise DeqguardError(f"--aa-from {path}: it scored another checkpoint "
                            f"({earlier.checkpoint.path}, sha256 {earlier.checkpoint.sha256[:12]})")
    theirs, ours = earlier.settings.model_dump(), settings.model_dump()
    differ = [k for k in SAME_SETTINGS if theirs.get(k) != ours.get(k)]
    if differ:
        raise DeqguardError(f"--aa-from {path}: {', '.join(differ)} differ from this run's")
    lo = settings.start - earlier.settings.start  # this run's first image in the earlier range
    if lo < 0 or lo + n > aa.n:
        raise DeqguardError(f"--aa-from {path}: AutoAttack scored images "
                            f"{image_range(earlier.settings.start, aa.n)} there; this run's "
                            f"{image_range(settings.start, n)} are not among them")
    wanted = list(settings.aa_attacks or STANDARD_ATTACKS)
    done = stages_of(aa.correct_after)
    if not runs_first(wanted, done) or len(wanted) <= len(done):
        raise DeqguardError(f"--aa-from {path}: it ran {','.join(done)}; --aa-attacks must begin "
                            f"with those and add at least one (got {','.join(wanted)})")
    flags = {k: torch.from_numpy(unbits(v).copy()) for k, v in aa.correct_after.items()}
    if any(len(f) != aa.n for f in flags.values()):
        raise DeqguardError(f"--aa-from {path}: its per-image outcomes do not hold {aa.n} images")
    # an earlier stage's time is known for its whole range only, so a part of it gets none
    whole = (lo, n) == (0, aa.n)
    return EarlierStages(report=str(path), created=earlier.created,
                         correct_after={k: f[lo:lo + n] for k, f in flags.items()},
                         seconds={k: aa.seconds[k] for k in done if k in aa.seconds and whole},
                         warnings=list(aa.warnings))
