"""Finding checkpoints in the BentoML model store by tag (`name:version`, `name:latest`).

BentoML users move models by tag: `bentoml models list/export/import`, and Bentos that carry the
models their service declares. A pushed deqguard checkpoint is stored as it is (the same
safetensors file, metadata and sha256 in its header) under `STORE_FILE`, with a copy of that
metadata as the stored model's labels and metadata (models/publish.py). This module only looks
models up, and imports neither torch nor the checkpoint code, which calls it
(`resolve_checkpoint`): the service's HTTP front uses it at import time and has no torch.

A tag always has a colon (`name:version`, `name:latest`), so a shipped name (`default`) or a file
name can never be mistaken for one. bentoml is imported lazily and only for text that looks like
a tag: a train-only install has no bentoml, and a missing path should not pay for importing it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_FILE = "checkpoint.safetensors"
# The `module` recorded with each stored model: `bentoml models list` shows which tool wrote it.
STORE_MODULE = "deqguard"
_PART = r"[a-z0-9](?:[-._a-z0-9]{0,61}[a-z0-9])?"  # BentoML's tag rule, at most 63 characters
_TAG = re.compile(rf"^{_PART}:{_PART}$")


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint file in the model store, with the tag and hash recorded when it was pushed."""

    tag: str
    path: Path
    sha256: str


def is_tag(text: str) -> bool:
    """True for `name:version` (or `name:latest`) as BentoML spells tags: lowercase, one colon."""
    return bool(_TAG.match(text))


def bentoml_available() -> bool:
    try:
        import bentoml  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def store_location() -> str:
    """Where this process's model store lives: $BENTOML_HOME/models (default ~/bentoml)."""
    home = os.environ.get("BENTOML_HOME", os.path.join(os.path.expanduser("~"), "bentoml"))
    return os.path.join(home, "models")


def find_stored(text: str) -> StoredCheckpoint | None:
    """The stored checkpoint a tag names, or None (not a tag, no bentoml, not in the store).

    Inside a Bento, BentoML points its model store at the Bento's own models, so a tag resolves to
    the copy the Bento carries. `path` may be missing: a stored model deqguard did not write.
    """
    if not is_tag(text) or not bentoml_available():
        return None
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        model = bentoml.models.get(text)
    except (NotFound, BentoMLException, ValueError):
        return None
    return StoredCheckpoint(tag=str(model.tag), path=Path(model.path_of(STORE_FILE)),
                            sha256=str(model.info.metadata.get("sha256", "")))


def stored_checkpoints() -> list[dict[str, Any]]:
    """Every deqguard checkpoint in the model store, newest first: tag, name, size, created."""
    import bentoml

    out = []
    for model in bentoml.models.list():
        if model.info.module != STORE_MODULE:
            continue
        meta = model.info.metadata
        out.append({"tag": str(model.tag), "checkpoint": meta.get("name", ""),
                    "classes": len(meta.get("classes", [])), "sha256": meta.get("sha256", ""),
                    "created": model.info.creation_time.isoformat(timespec="seconds")})
    return sorted(out, key=lambda m: m["created"], reverse=True)
