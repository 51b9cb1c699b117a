"""`deqguard models push`: a verified checkpoint into the BentoML model store, with a version.

Why a store at all: a checkpoint trained with `deqguard train` is otherwise only a path, with no
version, no way to move between machines but copying files, and no way into a Bento. Pushed, it
is `name:version` for `bentoml models list/export/import`, and the service can declare it so
`bentoml build` packs it. The file goes in byte for byte, so loading it later runs the same
checks (sha256 included) as loading a path; the checkpoint's metadata is copied into the store's
labels (short strings, for filtering) and metadata (for `bentoml models get`), with its sha256,
which `resolve_checkpoint` compares again on every load by tag.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from deqguard.store import STORE_FILE, STORE_MODULE, is_tag

from .checkpoint import CheckpointMetadata, load_checkpoint, resolve_checkpoint
from .errors import CheckpointError

NAME_PREFIX = "deqguard-"


def model_name_for(meta: CheckpointMetadata) -> str:
    """The store name a checkpoint gets by default: `deqguard-<its metadata name>`, lowercase."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", meta.name.lower()).strip("-._")
    name = (NAME_PREFIX + slug) if slug else NAME_PREFIX + "model"
    return name[:63].rstrip("-._")


def _plain(value: Any) -> Any:
    """JSON values BentoML accepts as model metadata: it refuses None, so None entries go."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value if v is not None]
    return value


def store_labels(meta: CheckpointMetadata) -> dict[str, str]:
    """Short string labels: what `bentoml models list` users filter on."""
    labels = {"project": "deqguard", "checkpoint": meta.name or "unnamed",
              "arch": str(meta.model.get("arch", "")), "classes": str(len(meta.classes)),
              "detection": "calibrated" if meta.detection else "none"}
    dataset = meta.trained_config("data").get("dataset")
    if dataset:
        labels["dataset"] = str(dataset)
    return labels


def store_metadata(meta: CheckpointMetadata) -> dict[str, Any]:
    """The checkpoint's own metadata, as a stored model's metadata (readable without deqguard)."""
    training = {k: v for k, v in meta.training.items() if k in ("command", "preset", "data")}
    return _plain({
        "name": meta.name, "sha256": meta.sha256, "created": meta.created,
        "deqguard_version": meta.deqguard_version, "format_version": meta.format_version,
        "classes": meta.classes, "input": meta.input.model_dump(mode="json"),
        "model": meta.model, "training": training, "metrics": meta.metrics,
        "detection": meta.detection,
    })


def push_checkpoint(checkpoint: str | os.PathLike, name: str | None = None) -> str:
    """Verify a checkpoint as loading does, store it, and return its new tag (`name:version`)."""
    import bentoml

    path = resolve_checkpoint(checkpoint)
    # A full load: the same refusals (format, metadata, structure, sha256) as serving it.
    _, meta = load_checkpoint(path, device="cpu")
    name = name or model_name_for(meta)
    if not is_tag(f"{name}:v"):
        raise CheckpointError(f"--name {name!r} is not a valid model name: lowercase letters, "
                              "digits, '-', '_' or '.', at most 63 characters, starting and "
                              "ending with a letter or digit (BentoML adds the version)")
    with bentoml.models.create(name, module=STORE_MODULE, labels=store_labels(meta),
                               metadata=store_metadata(meta)) as model:
        shutil.copyfile(path, model.path_of(STORE_FILE))
    return str(model.tag)
