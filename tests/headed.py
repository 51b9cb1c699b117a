"""The fixture network with a fresh rectifier head, for the tests of the head and the attacks
aimed at it (its A is some function of z* and, when the head reads one, of the path)."""

from __future__ import annotations

from typing import Any

import torch

from deqguard.models import build_model, load_checkpoint


def headed_model(checkpoint: Any, head: dict[str, Any], seed: int | None = 0) -> torch.nn.Module:
    """The checkpoint's network with the head `head` added (its own copy: trainable); `seed`
    fixes the head's initialisation (None: whatever the global generator gives)."""
    plain, _ = load_checkpoint(checkpoint, device="cpu")
    cfg = plain.config
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(type(cfg).model_validate({**cfg.model_dump(), "rectifier": head}))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("rectifier.") for k in missing)
    return model.eval()
