"""Datasets as (x float32 [C,H,W] in [0,1], y int), with a validation split carved from train.

Model selection must never look at the test set (the paper's code did), so "val" is a fixed-seed
slice of the training set and "train" is the rest. Augmentation can be seeded per sample: index a
dataset with `(i, seed)` instead of `i` and the random crop/flip for that sample depends on the
seed alone, whatever worker or process draws it. That is what makes a resumed run repeat an
uninterrupted one bit for bit.

    from deqguard.training.data import load_dataset, dataset_info
    train = load_dataset("fashion-mnist", "train", augment=True)
    x, y = train[0]                  # global RNG for the augmentation
    x, y = train[(0, 1234)]          # augmentation seeded by 1234
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..models.errors import DeqguardError

DatasetName = Literal["fashion-mnist", "cifar10", "imagefolder"]
Split = Literal["train", "val", "test"]
DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "imagefolder")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_DIR = Path.home() / ".cache" / "deqguard" / "cifar10"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


class DataError(DeqguardError):
    """A dataset is missing, malformed, or asked for in a way that cannot work."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model must be built for to read this dataset."""

    classes: list[str]
    in_channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# -- dataset wrappers ---------------------------------------------------------------------------
class TensorImages(Dataset):
    """Images held as one uint8 tensor [N, C, H, W]: cheap to index, cheap to hash."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"expected uint8 images [N,C,H,W], got {images.dtype} "
                            f"{list(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels.long(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div_(255.0), int(self.labels[i])


class _Indexed(Dataset):
    """A fixed subset of another dataset (torch's Subset, keeping `classes` reachable)."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


class Augmented(Dataset):
    """Applies a random transform; `ds[(i, seed)]` makes the draw depend on `seed` only."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, seed = key
            x, y = self.base[i]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self.transform(x), y
        x, y = self.base[key]
        return self.transform(x), y


def plain_index(key) -> int:
    """The sample index of a key that may carry an augmentation seed."""
    return key[0] if isinstance(key, tuple) else key


class _IgnoreSeed(Dataset):
    """Accepts `(i, seed)` keys on a dataset without augmentation, so samplers need not care."""

    def __init__(self, base: Dataset):
        self.base = base
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        return self.base[plain_index(key)]


# -- readers --------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST-format) array from a .gz or raw file; big-endian header, uint8 payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an uint8 IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"{path} is truncated: header says {dims}, payload has "
                        f"{len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}.gz not found in {root}. Install the Debian package "
        f"(`apt-get install dataset-fashion-mnist`, files in {FASHION_DIR}) or pass --data-dir "
        "pointing to a folder with the four IDX files (train-/t10k- images and labels, .gz or not)")


def _fashion_root(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else FASHION_DIR


def _load_fashion(root: Path, part: str) -> TensorImages:
    images, labels = _fashion_arrays(str(root.resolve()), part)
    return TensorImages(images, labels, list(FASHION_CLASSES))


@functools.lru_cache(maxsize=4)
def _fashion_arrays(root_str: str, part: str) -> tuple[Tensor, Tensor]:
    """Decompressing the training images takes about a second: do it once per process."""
    root = Path(root_str)
    img_stem, lab_stem = _FASHION_FILES[part]
    images = _read_idx(_fashion_file(root, img_stem))
    labels = _read_idx(_fashion_file(root, lab_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{root}: expected images [N,H,W] and labels [N], got {images.shape} "
                        f"and {labels.shape}")
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise DataError(f"{root}: label {int(labels.max())} is out of range for Fashion-MNIST")
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _cifar_root(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else CIFAR_DIR


def _load_cifar(root: Path, part: str, download: bool) -> TensorImages:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=part == "train", download=download)
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found in {root} ({exc}). Pass --data-dir to a folder holding "
            "cifar-10-batches-py, or add --download on a machine with internet") from None
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return TensorImages(x, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def _image_mode(root: Path) -> str:
    """'L' if the first image is grayscale, else 'RGB': the whole folder is read that way."""
    from PIL import Image

    first = next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in _IMAGE_SUFFIXES), None)
    if first is None:
        raise DataError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    with Image.open(first) as im:
        return "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"


def _imagefolder_root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise DataError("the imagefolder dataset needs --data-dir (a root/<class>/<image> tree, "
                        "optionally with train/ val/ test/ subfolders)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    return root


def _load_imagefolder(root: Path, image_size: int | None):
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    mode = _image_mode(root)
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if image_size is not None:
        steps.insert(0, v2.Resize((image_size, image_size), antialias=True))

    def loader(path: str):
        with Image.open(path) as im:
            return im.convert(mode)

    try:
        return ImageFolder(str(root), transform=v2.Compose(steps), loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root} is not a root/<class>/<image> tree: {exc}") from None


# -- public API -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropFlip:
    """The training augmentation: a random crop after zero padding, and maybe a mirror flip.

    One description serves both pipelines, the per-sample transform and the batched one on the
    device (`training/batches.py`), so the two cannot drift apart.
    """

    padding: int
    flip: bool


def augmentation_for(name: str) -> CropFlip:
    """Fashion-MNIST is not mirror-symmetric in meaning (a left shoe stays a left shoe): no flip."""
    return CropFlip(2, False) if name == "fashion-mnist" else CropFlip(4, True)


def _augmentation(name: str, image_size: int):
    from torchvision.transforms import v2

    spec = augmentation_for(name)
    crop = v2.RandomCrop(image_size, padding=spec.padding)
    return v2.Compose([crop, v2.RandomHorizontalFlip()]) if spec.flip else crop


def resident_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """(uint8 images [N,C,H,W], labels [N]) of a tensor-backed split, un-augmented; None for data
    read file by file (an image folder), which has to go through a DataLoader."""
    indices = None
    while True:
        if isinstance(dataset, (Augmented, _IgnoreSeed)):
            dataset = dataset.base
        elif isinstance(dataset, _Indexed):
            if indices is None:
                indices = torch.tensor(dataset.indices, dtype=torch.long)
            else:
                indices = torch.tensor(dataset.indices, dtype=torch.long)[indices]
            dataset = dataset.base
        elif isinstance(dataset, TensorImages):
            if indices is None:
                return dataset.images, dataset.labels
            return dataset.images[indices], dataset.labels[indices]
        else:
            return None


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) index lists: a seeded permutation, val first; both sorted."""
    if not 0 < val_size < n:
        raise DataError(f"validation size {val_size} must be between 1 and {n - 1} for a training "
                        f"set of {n} images (set data.val_size)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def load_dataset(name: DatasetName, split: Split, *, data_dir: str | Path | None = None,
                 augment: bool = False, val_size: int = 5000, seed: int = 0,
                 limit: int | None = None, download: bool = False,
                 image_size: int | None = None, start: int = 0) -> Dataset:
    """A map-style dataset of (x float32 [C,H,W] in [0,1], y int) for one split.

    An image folder is either root/<class>/<image> (val carved, no test split), or has train/
    and test/ subfolders (val carved from train/), or train/, val/ and test/.

    `val_size` images of the training set (a permutation seeded by `seed`) form "val"; "train"
    is the rest. `start` leaves out the split's first images and `limit` keeps the first N of
    the rest, so that an evaluation split into ranges (images 1,001-2,000) reads the images a
    run from image 1 would have scored there. `image_size` resizes an imagefolder (other
    datasets have a fixed size).
    """
    _check_name(name)
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use train, val or test")
    if start < 0:
        raise DataError(f"start must be >= 0, got {start}")
    part = "test" if split == "test" else "train"
    carve = split != "test"
    if name == "fashion-mnist":
        base: Dataset = _load_fashion(_fashion_root(data_dir), part)
    elif name == "cifar10":
        base = _load_cifar(_cifar_root(data_dir), part, download)
    else:
        root = _imagefolder_root(data_dir)
        if split == "test" and not (root / "test").is_dir():
            raise DataError(f"{root} has no test/ subfolder: an image folder without one only "
                            "gives train and val splits")
        if split == "test" or (root / "val").is_dir():
            base, carve = _load_imagefolder(root / split, image_size), False
        else:  # val carved from train/ (or from the root itself when it has no train/)
            src = root / "train" if (root / "train").is_dir() else root
            base = _load_imagefolder(src, image_size)
    if carve:
        train_idx, val_idx = split_indices(len(base), val_size, seed)
        indices: Sequence[int] = train_idx if split == "train" else val_idx
    else:
        indices = range(len(base))
    if start and start >= len(indices):
        raise DataError(f"start {start} leaves no image: the {split} split of {name} has "
                        f"{len(indices)}")
    end = len(indices) if limit is None else min(start + limit, len(indices))
    ds: Dataset = (base if (start, end, carve) == (0, len(base), False)
                   else _Indexed(base, list(indices[start:end])))
    if augment:
        x0, _ = base[0]
        return Augmented(ds, _augmentation(name, int(x0.shape[-1])))
    return _IgnoreSeed(ds)


def dataset_info(name: DatasetName, data_dir: str | Path | None = None) -> DatasetInfo:
    """Class names, channels and image size, without reading the whole dataset when avoidable."""
    _check_name(name)
    if name == "fashion-mnist":
        _fashion_file(_fashion_root(data_dir), _FASHION_FILES["train"][0])
        return DatasetInfo(list(FASHION_CLASSES), 1, 28)
    if name == "cifar10":
        return DatasetInfo(list(CIFAR_CLASSES), 3, 32)
    root = _imagefolder_root(data_dir)
    sub = root / "train" if (root / "train").is_dir() else root
    ds = _load_imagefolder(sub, None)
    x0, _ = ds[0]
    if x0.shape[-1] != x0.shape[-2]:
        raise DataError(f"images under {sub} are not square ({list(x0.shape)}); resize them")
    return DatasetInfo(list(ds.classes), int(x0.shape[0]), int(x0.shape[-1]))


def _source_files(name: str, data_dir: str | Path | None) -> list[Path]:
    if name == "fashion-mnist":
        root = _fashion_root(data_dir)
        return [_fashion_file(root, stem) for pair in _FASHION_FILES.values() for stem in pair]
    if name == "cifar10":
        root = _cifar_root(data_dir) / "cifar-10-batches-py"
        files = sorted(p for p in root.glob("*") if p.is_file()) if root.is_dir() else []
        if not files:
            raise DataError(f"CIFAR-10 files not found in {root}")
        return files
    root = _imagefolder_root(data_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def data_fingerprint(name: DatasetName, data_dir: str | Path | None = None) -> str:
    """sha256 over the dataset's source files (relative names and bytes), for metadata.

    Two runs with equal fingerprints read the same bytes, wherever the files live.
    """
    _check_name(name)
    files = _source_files(name, data_dir)
    base = {"fashion-mnist": _fashion_root, "cifar10": _cifar_root,
            "imagefolder": _imagefolder_root}[name](data_dir)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(base)).encode())
        h.update(b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tensor_fingerprint(dataset: Dataset) -> str:
    """sha256 over the (un-augmented) samples of a dataset, for data not backed by files."""
    if isinstance(dataset, Augmented):
        dataset = dataset.base
    h = hashlib.sha256()
    for i in range(len(dataset)):
        x, y = dataset[plain_index(i)]
        h.update(np.ascontiguousarray(x.numpy()).tobytes())
        h.update(int(y).to_bytes(8, "little", signed=True))
    return h.hexdigest()
