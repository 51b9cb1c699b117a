"""Which files a scoring run covers, in which order, and their labels when the folder has them.

Order is the sorted relative path, so a run, its resumption and every engine see the same list.
Labels follow torchvision's ImageFolder layout (root/<class>/.../<image>): a top-level folder
named after one of the checkpoint's classes labels the images under it. Class names need not be
valid folder names ("T-shirt/top" is not), so a folder matches a class by `folder_key`: each
character a folder name cannot hold (/ \\ : * ? " < > |, control characters) and each space
becomes "_", and case is ignored. "T-shirt/top" is therefore the folder `T-shirt_top`, and
"Ankle boot" may be `Ankle boot` or `ankle_boot`. Top-level folders that match no class keep
their images unlabelled and are named in `FolderLabels.unmatched`, so the run can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# torchvision.datasets.folder.IMG_EXTENSIONS, plus .gif (PIL decodes its first frame).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
# Characters that no folder name can hold on some common file system (Windows' list; "/" too).
UNSAFE_CHARACTERS = frozenset('/\\:*?"<>|')


@dataclass(frozen=True)
class Item:
    """One file to score: `path` is relative to the input folder (POSIX), the row's key."""

    path: str
    file: str
    label: int | None


@dataclass(frozen=True)
class FolderLabels:
    """How the input's top-level folders map to class indices, and which match no class."""

    matched: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.matched)


def folder_name(class_name: str) -> str:
    """The folder name that stands for a class: unsafe characters become "_"."""
    return "".join("_" if c in UNSAFE_CHARACTERS or ord(c) < 32 else c for c in class_name)


def folder_key(name: str) -> str:
    """What a folder and a class name are compared by: `folder_name`, spaces as "_", any case."""
    return "_".join(folder_name(name).split(" ")).casefold()


def class_index(classes: list[str]) -> dict[str, int]:
    """Folder key -> class index; a key two classes share matches neither (only exact names)."""
    index: dict[str, int] = {}
    shared: set[str] = set()
    for i, name in enumerate(classes):
        key = folder_key(name)
        if key in index:
            shared.add(key)
        index.setdefault(key, i)
    return {k: i for k, i in index.items() if k not in shared}


def find_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, recursively, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"input folder not found: {base}")
    found = [p.relative_to(base).as_posix() for p in base.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
             and not any(part.startswith(".") for part in p.relative_to(base).parts)]
    return sorted(found)


def folder_labels(root: str | Path, classes: list[str]) -> FolderLabels:
    """Which top-level folders of `root` name a class (exact name first, then `folder_key`)."""
    exact = {name: i for i, name in enumerate(classes)}
    by_key = class_index(classes)
    matched: dict[str, int] = {}
    unmatched: list[str] = []
    dirs = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in dirs:
        i = exact.get(d, by_key.get(folder_key(d)))
        if i is None:
            unmatched.append(d)
        else:
            matched[d] = i
    return FolderLabels(matched, unmatched)


def build_items(root: str | Path, classes: list[str]) -> tuple[list[Item], FolderLabels]:
    """The run's items, labelled by the top-level folder where it names a class."""
    base = Path(root)
    labels = folder_labels(base, classes)
    items = []
    for rel in find_images(base):
        top = rel.split("/", 1)[0] if "/" in rel else None
        label = labels.matched.get(top) if top is not None else None
        items.append(Item(path=rel, file=str(base / rel), label=label))
    return items, labels


def describe_unmatched(labels: FolderLabels, classes: list[str], limit: int = 10) -> str | None:
    """A one-line warning about folders that name no class, or None when there are none."""
    if not labels.unmatched:
        return None
    names = ", ".join(f"{d}/" for d in labels.unmatched[:limit])
    if len(labels.unmatched) > limit:
        names += f" and {len(labels.unmatched) - limit} more"
    expected = ", ".join(folder_name(c) for c in classes[:limit])
    if len(classes) > limit:
        expected += ", ..."
    rule = f"class folders: {expected}; case is ignored and a space may be _"
    if labels.labelled:
        return (f"images under {names} get no label: no class of the model has that folder "
                f"name ({rule})")
    return (f"no image gets a label and no accuracy is given: no top-level folder ({names}) "
            f"is named after a class of the model ({rule})")
