"""Catastrophic-overfitting guard for single-step adversarial training.

Single-step training (FGSM-RS, N-FGSM) can suddenly learn to defeat its own one-step attack while
multi-step robustness collapses (Wong, Rice, Kolter 2020). The training attack's accuracy then
rises as the validation PGD accuracy falls: that divergence, not either number alone, is the sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def catastrophic_overfitting(history: Sequence[dict[str, Any]], drop: float) -> str | None:
    """Why the last epoch looks catastrophically overfitted, or None.

    Fires when the last epoch's validation PGD accuracy is more than `drop` (absolute) under the
    best earlier epoch's while the training-attack accuracy is above that epoch's.
    """
    scored = [h for h in history if h.get("val_pgd_accuracy") is not None]
    if len(scored) < 2:
        return None
    last = scored[-1]
    best = max(scored[:-1], key=lambda h: h["val_pgd_accuracy"])
    fell = best["val_pgd_accuracy"] - last["val_pgd_accuracy"]
    train_now, train_then = last.get("train_adv_accuracy"), best.get("train_adv_accuracy")
    if fell <= drop or train_now is None or train_then is None or train_now <= train_then:
        return None
    return (f"catastrophic overfitting at epoch {last['epoch']}: validation PGD accuracy "
            f"{last['val_pgd_accuracy']:.3f}, {fell:.3f} under epoch {best['epoch']}'s "
            f"{best['val_pgd_accuracy']:.3f}, while the training attack's accuracy rose "
            f"{train_then:.3f} -> {train_now:.3f}")
