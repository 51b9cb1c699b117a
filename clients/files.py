"""Which files a scoring run covers, in which order, and their labels when the folder has them.

Order is the sorted relative path, so a run, its resumption and every engine see the same list.
Labels follow torchvision's ImageFolder layout (root/<class>/.../<image>): when every top-level
folder is one of the checkpoint's class names, that name is the label of the images under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# torchvision.datasets.folder.IMG_EXTENSIONS, plus .gif (PIL decodes its first frame).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})


@dataclass(frozen=True)
class Item:
    """One file to score: `path` is relative to the input folder (POSIX), the row's key."""

    path: str
    file: str
    label: int | None


def find_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, recursively, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"input folder not found: {base}")
    found = [p.relative_to(base).as_posix() for p in base.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
             and not any(part.startswith(".") for part in p.relative_to(base).parts)]
    return sorted(found)


def class_layout(root: str | Path, classes: list[str]) -> bool:
    """Whether `root` is an ImageFolder of these classes: every top-level folder is a class."""
    dirs = [p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(dirs) and all(d in classes for d in dirs)


def build_items(root: str | Path, classes: list[str]) -> tuple[list[Item], bool]:
    """The run's items, and whether they carry labels (ImageFolder layout of `classes`)."""
    base = Path(root)
    labelled = class_layout(base, classes)
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for rel in find_images(base):
        top = rel.split("/", 1)[0] if "/" in rel else None
        label = index.get(top) if labelled and top is not None else None
        items.append(Item(path=rel, file=str(base / rel), label=label))
    return items, labelled
