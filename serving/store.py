"""The model the service declares, so that `bentoml build` packs a stored checkpoint into a Bento.

BentoML discovers a service's models from `BentoModel` class attributes when the service class is
created, i.e. when service.py is imported; so the checkpoint setting (env or `--arg`) decides it
at import time. A model-store tag is declared; a path or a shipped name declares nothing (as
before: the path must exist where the server runs, and `default` ships inside the wheel).
Torch-free on purpose: the HTTP front imports this module too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deqguard.store import find_stored, is_tag

log = logging.getLogger("deqguard.serving")


def declared_model(checkpoint: str) -> Any | None:
    """`bentoml.models.BentoModel` pinning the stored model `checkpoint` names, else None.

    The tag is pinned to its version (`name:latest` becomes `name:<version>`), so a Bento states
    exactly which model it carries. Text that is neither a file nor a stored model declares
    nothing: the service's preflight then refuses it with the full explanation.
    """
    if not is_tag(checkpoint) or Path(checkpoint).exists():
        return None
    stored = find_stored(checkpoint)
    if stored is None:
        log.warning("checkpoint %r is neither a file nor a stored model: no model declared",
                    checkpoint)
        return None
    from bentoml.models import BentoModel

    return BentoModel(stored.tag)
