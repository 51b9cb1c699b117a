"""Warm starts: a run that begins from another checkpoint's weights instead of a fresh init.

Why: a model trained on a GPU can be trained further where only a CPU is left, and the result
must still say exactly where it came from. The parent's tensor hash, name, training command and
metrics go into the child's metadata (`training.init`), so the chain of commands that produced a
shipped checkpoint stays readable from the file alone.
"""

from __future__ import annotations

from typing import Any

from ..models import load_checkpoint
from ..models.classifier import Classifier
from ..models.config import ModelConfig
from ..models.errors import DeqguardError
from .config import config_differences, flatten


def warm_start(model: Classifier, model_cfg: ModelConfig, source: str) -> dict[str, Any]:
    """Load `source`'s weights into `model` (same architecture only); returns its provenance.

    The architecture must match field for field, the solver settings included, so that a run's
    preset describes the model it trains; the checkpoint's own hash check runs on the load. The
    one difference allowed is a rectifier head the parent lacks: the child starts with the
    parent's network and a freshly initialised head (fine-tuning a doubt head onto a shipped
    model).
    """
    parent, meta = load_checkpoint(source, device="cpu")
    child = model_cfg.model_dump(mode="json")
    adds_head = meta.model.get("rectifier") is None and child.get("rectifier") is not None
    ignore = frozenset(["rectifier", *(k for k in flatten(child) if k.startswith("rectifier."))]
                       if adds_head else [])
    differ = config_differences(meta.model, child, ignore=ignore)
    if differ:
        raise DeqguardError(f"train.init_from={source!r}: its model differs from this run's: "
                            + "; ".join(differ[:6]))
    if adds_head:
        # the head is the only thing the parent lacks; everything else must load exactly
        missing, unexpected = model.load_state_dict(parent.state_dict(), strict=False)
        if unexpected or any(not k.startswith("rectifier.") for k in missing):
            raise DeqguardError(f"train.init_from={source!r}: its tensors do not match this "
                                f"run's model (missing {missing[:5]}, unexpected "
                                f"{unexpected[:5]})")
    else:
        model.load_state_dict(parent.state_dict())
    training = meta.training
    return {
        "source": source, "sha256": meta.sha256, "name": meta.name,
        "command": training.get("command"), "preset": training.get("preset"),
        "epochs_completed": training.get("epochs_completed"),
        "device": training.get("device"), "torch_version": training.get("torch_version"),
        "parent_init": training.get("init"),
        "metrics": {k: v for k, v in meta.metrics.items()
                    if k in ("test_clean_accuracy", "val_clean_accuracy", "val_pgd_accuracy")},
    }
