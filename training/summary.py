"""The few lines `deqguard train` ends with: what was trained, and what its numbers mean.

Why: the JSON the run prints is for scripts. A person who just ran a one-epoch smoke run sees
10.5% and cannot tell a broken install from an expected result, nor a run's checkpoint from the
shipped model of the same preset. So the summary says which accuracy is which, where chance
level lies, and that a short run near chance is expected and is not the shipped model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deqguard.models import CheckpointMetadata

# "Near chance": less than a tenth of the way from chance level to a perfect score.
NEAR_CHANCE_SHARE = 0.1


def chance_level(num_classes: int) -> float:
    """Accuracy of guessing: what an untrained model scores on balanced classes."""
    return 1.0 / max(num_classes, 1)


def near_chance(accuracy: float, num_classes: int) -> bool:
    chance = chance_level(num_classes)
    return accuracy < chance + NEAR_CHANCE_SHARE * (1.0 - chance)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def run_summary(meta: CheckpointMetadata, path: str | Path,
                average: tuple[CheckpointMetadata, str | Path] | None = None,
                epochs_run: int | None = None) -> str:
    """The end-of-run summary for the checkpoint at `path` (the best epoch's), several lines;
    `average`: the weight average's best checkpoint and its path, when the run kept one;
    `epochs_run`: how many epochs the run trained, which the best checkpoint's own metadata
    cannot say when a later epoch validated worse (it was saved then, not at the end)."""
    m: dict[str, Any] = meta.metrics
    t: dict[str, Any] = meta.training
    classes = len(meta.classes)
    epochs = int(epochs_run if epochs_run is not None else t.get("epochs_completed") or 0)
    data = t.get("data") or {}
    train_images = data.get("train_images")
    preset = t.get("preset") or "?"
    size = f"{_plural(epochs, 'epoch')}"
    if train_images is not None:
        size += f" on {_plural(int(train_images), 'training image')}"
    best = m.get("best_epoch", m.get("epoch", "?"))
    lines = [f"deqguard train: run {meta.name!r} done: {size} (preset {preset})",
             f"  checkpoint  {path} (best epoch {best} of {epochs}), named {meta.name!r}"]
    clean = m.get("val_clean_accuracy")
    if clean is not None:
        pgd, attack = m.get("val_pgd_accuracy"), m.get("val_pgd") or {}
        lines += [f"  validation  clean accuracy {clean:.1%}, PGD accuracy {pgd:.1%} on "
                  f"{_plural(int(m.get('val_images', 0)), 'image')}",
                  f"              (PGD accuracy: under a {attack.get('steps', '?')}-step attack "
                  f"within L-inf eps {attack.get('eps', '?')}, the robustness trained for)"]
    if m.get("test_clean_accuracy") is not None:
        lines.append(f"  test        clean accuracy {m['test_clean_accuracy']:.1%} on the first "
                     f"{_plural(int(m.get('test_clean_images', 0)), 'image')}")
    lines.append(f"  chance level for {classes} classes is {chance_level(classes):.0%} (guessing).")
    if clean is not None and near_chance(float(clean), classes):
        lines[-1] += " Near chance is expected after a run this short;"
        lines.append("  this checkpoint is not the shipped model (`deqguard serve default` "
                     "serves that one).")
    lines.append(f"  serve it    deqguard serve {path}")
    if average is not None:
        am, apath = average[0].metrics, average[1]
        lines.append(f"  average     {apath} (epoch {am.get('best_epoch', '?')}): validation "
                     f"clean {am.get('val_clean_accuracy', 0):.1%}, PGD "
                     f"{am.get('val_pgd_accuracy', 0):.1%} (weights averaged from step "
                     f"{average[0].training.get('weight_average', {}).get('start_step', '?')})")
    return "\n".join(lines)
