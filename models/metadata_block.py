"""Typed blocks that later commands add to a checkpoint's metadata (the learned detector, the
selective calibration), read back with one set of refusals.

A block is numbers fitted on particular weights: a threshold or a score scale means nothing on
other weights, so a block whose `model_sha256` differs from the checkpoint's is refused rather
than silently applied, and a malformed block is refused with the field that is wrong. The
message always says how to remake the block.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import CheckpointError

Block = TypeVar("Block", bound=BaseModel)


def read_block(meta: Any, key: str, model: type[Block], *, what: str, verb: str,
               meaning: str, fix: str) -> Block | None:
    """metadata[key] validated as `model`, or None when absent; CheckpointError if unusable.

    `meta` is a CheckpointMetadata (extra keys live in its model_extra) or a plain dict. `what`
    names the block ("detector"), `verb` how it was made ("fitted"), `meaning` what a foreign
    block's numbers lose ("its threshold means"), `fix` the command that remakes it.
    """
    raw = meta.get(key) if isinstance(meta, dict) else (meta.model_extra or {}).get(key)
    if raw is None:
        return None
    try:
        block = model.model_validate(raw)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'block'}: {e['msg']}"
                         for e in exc.errors())
        raise CheckpointError(f"the checkpoint's {what} is invalid: {msgs}. {fix} or remove "
                              "it") from None
    sha = meta.get("sha256") if isinstance(meta, dict) else meta.sha256
    made_for = getattr(block, "model_sha256", None)
    if made_for and sha and made_for != sha:
        raise CheckpointError(
            f"the checkpoint's {what} was {verb} for other weights (sha256 {made_for[:12]}..., "
            f"these are {str(sha)[:12]}...): {meaning} nothing here. {fix} or remove it")
    return block
