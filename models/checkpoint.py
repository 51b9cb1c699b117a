"""Safetensors checkpoints with their provenance in the header, and strict loading.

Never a pickle: a checkpoint is tensors plus JSON metadata (model config, input spec, classes,
training recipe and command, metrics, detection calibration) and a sha256 over the tensors.
Loading refuses anything it cannot trust, naming the problem. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from deqguard.fileio import atomic_write_bytes
from deqguard.shipped import SHIPPED_CHECKPOINTS, SHIPPED_NAMES

from .classifier import Classifier
from .device import resolve_device
from .errors import CheckpointError
from .registry import build_model, parse_model_config

FORMAT_VERSION = 1
_META_KEY = "deqguard"
_MAX_HEADER = 64 * 1024 * 1024
WEIGHTS_DIR = Path(__file__).parent / "weights"
NAMED_CHECKPOINTS = {name: WEIGHTS_DIR / file for name, file in SHIPPED_CHECKPOINTS.items()}
# Written by save_checkpoint from the model itself; update_metadata must not touch them.
_WRITER_FIELDS = frozenset({"format_version", "deqguard_version", "model", "sha256"})


class InputSpec(BaseModel):
    """How an image must be prepared before the model sees it."""

    model_config = ConfigDict(extra="forbid")
    channels: int
    height: int
    width: int
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class CheckpointMetadata(BaseModel):
    """Everything a checkpoint says about itself; unknown keys are kept for newer writers."""

    model_config = ConfigDict(extra="allow")
    format_version: int = FORMAT_VERSION
    deqguard_version: str = ""
    name: str = ""
    created: str = ""
    model: dict[str, Any]
    input: InputSpec
    classes: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    detection: dict[str, Any] | None = None
    sha256: str = ""

    def trained_config(self, section: str) -> dict[str, Any]:
        """A copy of one section (`data`, `eval`, `optim`, ...) of the training config the
        trainer recorded; {} for a checkpoint that records none, so callers need no guards."""
        config = (self.training or {}).get("config") or {}
        return dict(config.get(section) or {})


def tensor_sha256(tensors: dict[str, Tensor]) -> str:
    """Hash over names, dtypes, shapes and bytes in name order: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's path by name (`default`), the given path when it exists, else the
    file of a BentoML model-store tag (`name:version`, `name:latest`).

    The order makes a path and a tag unambiguous: a file that exists always wins. Text that is
    neither a file nor a stored model fails here, naming all three places tried; a missing path
    that cannot be a tag (no colon) is left to the loader's "checkpoint not found".
    """
    from deqguard.store import bentoml_available, find_stored, is_tag, store_location

    key = str(name_or_path)
    if key in NAMED_CHECKPOINTS:
        return NAMED_CHECKPOINTS[key]
    path = Path(key)
    if path.exists() or not is_tag(key):
        return path
    stored = find_stored(key)
    if stored is None:
        where = (f"not a model in the BentoML model store ({store_location()}; see "
                 "`deqguard models list`)" if bentoml_available()
                 else "not looked up in a BentoML model store (bentoml is not installed)")
        raise CheckpointError(f"checkpoint not found: {key!r} is not a file, not a shipped name "
                              f"({SHIPPED_NAMES}), and {where}")
    if not stored.path.is_file():
        raise CheckpointError(f"model {stored.tag} in the BentoML model store holds no deqguard "
                              f"checkpoint ({stored.path.name} missing in {stored.path.parent}); "
                              "store checkpoints with `deqguard models push CKPT`")
    header = read_metadata(stored.path)
    if stored.sha256 and header.sha256 != stored.sha256:
        raise CheckpointError(
            f"{stored.tag}: the stored checkpoint's sha256 is {header.sha256[:16]}..., the model "
            f"store recorded {stored.sha256[:16]}... when it was pushed: {stored.path} was "
            "altered or replaced")
    return stored.path


def _serialise(tensors: dict[str, Tensor], meta: CheckpointMetadata) -> bytes:
    from safetensors.torch import save

    header = {_META_KEY: meta.model_dump_json(), "format": "deqguard-checkpoint"}
    return save(tensors, metadata=header)


def default_metadata(model: Classifier) -> dict[str, Any]:
    c = model.config
    return {
        "model": c.model_dump(mode="json"),
        "input": {"channels": c.in_channels, "height": c.image_size, "width": c.image_size},
        "classes": [str(i) for i in range(c.num_classes)],
    }


def save_checkpoint(model: Classifier, path: str | os.PathLike,
                    metadata: dict[str, Any] | CheckpointMetadata | None = None
                    ) -> CheckpointMetadata:
    """Write the model's weights and metadata atomically; returns the metadata as written."""
    if isinstance(metadata, CheckpointMetadata):
        given = metadata.model_dump()
    else:
        given = dict(metadata or {})
    from deqguard import __version__

    fields = {**default_metadata(model), **given}
    fields["model"] = model.config.model_dump(mode="json")  # the truth is the model itself
    fields.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    fields["format_version"] = FORMAT_VERSION
    fields["deqguard_version"] = __version__
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fields["sha256"] = tensor_sha256(tensors)
    meta = CheckpointMetadata.model_validate(fields)
    c = model.config
    if len(meta.classes) != c.num_classes:
        raise CheckpointError(
            f"{len(meta.classes)} class names for a model with {c.num_classes} classes")
    spec = meta.input
    if (spec.channels, spec.height, spec.width) != (c.in_channels, c.image_size, c.image_size):
        raise CheckpointError(
            f"input spec {spec.channels}x{spec.height}x{spec.width} does not match the model's "
            f"{c.in_channels}x{c.image_size}x{c.image_size} inputs")
    atomic_write_bytes(Path(path), _serialise(tensors, meta))
    return meta


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header before trusting the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path} is not a safetensors file, or its header is truncated "
                f"(header claims {n} bytes, file has {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(
            f"{path} is not a safetensors file (a tensor entry lacks valid data_offsets)") from None
    if not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path} is not a safetensors file (__metadata__ is not an object)")
    need, have = max(ends, default=0), size - 8 - n
    if have < need:
        raise CheckpointError(f"{path} is truncated: the header needs {need} bytes of tensor "
                              f"data, the file has {have}")
    return header


def read_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """The checkpoint's metadata, validated, without loading any tensors."""
    p = resolve_checkpoint(path)
    header = _read_header(p)
    extra = header.get("__metadata__") or {}
    if _META_KEY not in extra:
        raise CheckpointError(f"{p} is a safetensors file but not a deqguard checkpoint "
                              "(no deqguard metadata in its header)")
    try:
        raw = json.loads(extra[_META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: the deqguard metadata is not valid JSON") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{p}: unknown checkpoint format version {version!r} "
                              f"(this deqguard reads version {FORMAT_VERSION})")
    try:
        return CheckpointMetadata.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{p}: invalid deqguard metadata: {exc}") from None


def _default_device() -> torch.device:
    return torch.device(resolve_device("auto"))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None
                    ) -> tuple[Classifier, CheckpointMetadata]:
    """Rebuild the model a checkpoint describes and load its weights, refusing anything off.

    The model comes back in eval mode on `device` (CUDA when present, else CPU, by default).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_checkpoint(path)
    meta = read_metadata(p)
    try:
        tensors = load_file(str(p), device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(f"{p}: unreadable tensors: {exc}") from None
    try:
        model = build_model(parse_model_config(meta.model))
    except (ValidationError, ValueError) as exc:
        raise CheckpointError(f"{p}: the model config in its metadata is invalid: {exc}") from None
    # Structure first, then the hash: a missing tensor or a wrong shape is named as such even
    # when the hash (rightly) fails too.
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{p}: tensors do not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{p}: tensor shapes do not match the model: {wrong[:5]}")
    wrong = [f"{k}: file {tensors[k].dtype} vs model {v.dtype}"
             for k, v in expected.items() if tensors[k].dtype != v.dtype]
    if wrong:
        raise CheckpointError(f"{p}: tensor dtypes do not match the model: {wrong[:5]}")
    digest = tensor_sha256(tensors)
    if digest != meta.sha256:
        raise CheckpointError(f"{p}: sha256 of the tensors is {digest[:16]}..., the metadata says "
                              f"{meta.sha256[:16]}...: the file was altered or corrupted")
    model.load_state_dict(tensors, strict=True)
    return model.to(_default_device() if device is None else torch.device(device)).eval(), meta


def update_metadata(path: str | os.PathLike, **fields: Any) -> CheckpointMetadata:
    """Rewrite a checkpoint's metadata fields (e.g. detection calibration), tensors untouched."""
    from safetensors.torch import load_file

    fixed = sorted(set(fields) & _WRITER_FIELDS)
    if fixed:
        raise CheckpointError(f"update_metadata cannot change {fixed}: they describe the tensors "
                              "and the format; save a new checkpoint instead")
    p = resolve_checkpoint(path)
    meta = read_metadata(p)
    tensors = load_file(str(p), device="cpu")
    if tensor_sha256(tensors) != meta.sha256:
        raise CheckpointError(f"{p}: refusing to update a checkpoint whose tensors fail their hash")
    try:
        new = CheckpointMetadata.model_validate({**meta.model_dump(), **fields})
    except ValidationError as exc:
        raise CheckpointError(f"invalid metadata update: {exc}") from None
    atomic_write_bytes(p, _serialise(tensors, new))
    return new
