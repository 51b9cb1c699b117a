"""Datasets: IDX reading, the carved validation split, seeded augmentation, clear errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from deqguard.models.errors import DeqguardError
from deqguard.training.data import (
    FASHION_CLASSES,
    DataError,
    data_fingerprint,
    dataset_info,
    load_dataset,
    split_indices,
    tensor_fingerprint,
)


def test_fashion_format_reads_pattern_files(pattern_idx_dir, pattern_data):
    test = load_dataset("fashion-mnist", "test", data_dir=pattern_idx_dir)
    train = load_dataset("fashion-mnist", "train", data_dir=pattern_idx_dir, val_size=64)
    val = load_dataset("fashion-mnist", "val", data_dir=pattern_idx_dir, val_size=64)
    assert (len(train), len(val), len(test)) == (448, 64, 128)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert isinstance(y, int)
    # the stored bytes are the generated images (quantised to uint8)
    xs, ys = pattern_data
    tr_idx, _ = split_indices(512, 64, 0)
    assert np.allclose(x.numpy(), np.round(xs[tr_idx[0]] * 255) / 255, atol=1e-6)
    assert y == ys[tr_idx[0]]


def test_val_is_carved_from_train_and_fixed():
    tr, va = split_indices(1000, 100, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == 1000
    assert (tr, va) == split_indices(1000, 100, seed=3)
    assert va != split_indices(1000, 100, seed=4)[1]
    with pytest.raises(DataError, match="val_size"):
        split_indices(10, 10, 0)


def test_limit_and_seeded_augmentation(pattern_idx_dir):
    ds = load_dataset("fashion-mnist", "train", data_dir=pattern_idx_dir, val_size=64,
                      augment=True, limit=10)
    assert len(ds) == 10
    a, _ = ds[(3, 123)]
    b, _ = ds[(3, 123)]
    assert torch.equal(a, b)
    crops = {ds[(3, s)][0].numpy().tobytes() for s in range(12)}
    assert len(crops) > 1  # the crop really is random across seeds
    plain = load_dataset("fashion-mnist", "train", data_dir=pattern_idx_dir, val_size=64, limit=10)
    assert torch.equal(plain[(3, 99)][0], plain[3][0])  # seed keys accepted without augmentation


@pytest.mark.parametrize("split", ["test", "val"])
def test_start_leaves_out_the_first_images_of_the_split(pattern_idx_dir, split):
    whole = load_dataset("fashion-mnist", split, data_dir=pattern_idx_dir, val_size=64)
    later = load_dataset("fashion-mnist", split, data_dir=pattern_idx_dir, val_size=64,
                         start=5, limit=6)
    assert len(later) == 6
    for i in range(6):
        assert torch.equal(later[i][0], whole[5 + i][0]) and later[i][1] == whole[5 + i][1]
    tail = load_dataset("fashion-mnist", split, data_dir=pattern_idx_dir, val_size=64,
                        start=len(whole) - 2, limit=10)
    assert len(tail) == 2  # the limit stops at the split's end
    with pytest.raises(DataError, match=f"start {len(whole)} leaves no image"):
        load_dataset("fashion-mnist", split, data_dir=pattern_idx_dir, val_size=64,
                     start=len(whole))
    with pytest.raises(DataError, match="start must be >= 0"):
        load_dataset("fashion-mnist", split, data_dir=pattern_idx_dir, val_size=64, start=-1)


def test_missing_data_names_path_and_fix(tmp_path):
    with pytest.raises(DeqguardError) as exc:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", "train")  # type: ignore[arg-type]


def test_truncated_idx_file_is_refused(tmp_path, pattern_idx_dir):
    for f in pattern_idx_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path, val_size=64)


def test_info_and_fingerprints(tmp_path, pattern_idx_dir):
    info = dataset_info("fashion-mnist", pattern_idx_dir)
    assert info.classes == FASHION_CLASSES and (info.in_channels, info.image_size) == (1, 28)
    fp = data_fingerprint("fashion-mnist", pattern_idx_dir)
    assert len(fp) == 64 and fp == data_fingerprint("fashion-mnist", pattern_idx_dir)
    for f in pattern_idx_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert data_fingerprint("fashion-mnist", tmp_path) == fp  # location-independent
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    assert data_fingerprint("fashion-mnist", tmp_path) != fp
    ds = load_dataset("fashion-mnist", "val", data_dir=pattern_idx_dir, val_size=64)
    assert tensor_fingerprint(ds) == tensor_fingerprint(ds)


def test_imagefolder_with_carved_split(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    info = dataset_info("imagefolder", tmp_path)
    assert info.classes == ["cat", "dog"] and (info.in_channels, info.image_size) == (1, 12)
    train = load_dataset("imagefolder", "train", data_dir=tmp_path, val_size=3, augment=True)
    val = load_dataset("imagefolder", "val", data_dir=tmp_path, val_size=3)
    assert (len(train), len(val)) == (7, 3)
    assert train[(0, 1)][0].shape == (1, 12, 12)
    with pytest.raises(DataError, match="test"):
        load_dataset("imagefolder", "test", data_dir=tmp_path)


def test_imagefolder_with_train_and_test_subfolders(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    assert dataset_info("imagefolder", tmp_path).classes == ["a", "b"]
    train = load_dataset("imagefolder", "train", data_dir=tmp_path, val_size=4)
    val = load_dataset("imagefolder", "val", data_dir=tmp_path, val_size=4)
    test = load_dataset("imagefolder", "test", data_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (8, 4, 4)
    assert train[0][0].shape == (3, 10, 10)
