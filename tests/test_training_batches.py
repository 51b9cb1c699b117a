"""The resident batch pipeline: same samples and the same augmentation law as the DataLoader's,
decided by each sample's seed alone, so that a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import torch

from deqguard.training.batches import ResidentBatches
from deqguard.training.data import CropFlip, load_dataset, resident_tensors
from deqguard.training.seeds import EpochBatches


def _split(pattern_idx_dir, **kw):
    return load_dataset("fashion-mnist", "train", data_dir=pattern_idx_dir, val_size=64, **kw)


def test_resident_tensors_are_the_split_the_loader_reads(pattern_idx_dir):
    ds = _split(pattern_idx_dir, limit=40)
    images, labels = resident_tensors(ds)
    assert images.dtype == torch.uint8 and images.shape == (40, 1, 28, 28)
    for i in (0, 17, 39):
        x, y = ds[i]
        assert torch.equal(images[i].float() / 255, x) and int(labels[i]) == y


def test_without_augmentation_a_batch_is_the_loaders_batch(pattern_idx_dir):
    ds = _split(pattern_idx_dir)
    batches = ResidentBatches(*resident_tensors(ds), None, torch.device("cpu"))
    sampler = EpochBatches(len(ds), 8, seed=3, epoch=1)
    for (idx, seeds), keys in zip(sampler.index_tensors(), sampler, strict=True):
        x, y = batches.batch(idx, seeds)
        ref = [ds[k] for k in keys]
        assert torch.equal(x, torch.stack([r[0] for r in ref]))
        assert y.tolist() == [r[1] for r in ref]


def test_crop_and_flip_follow_the_seed_and_cover_every_offset():
    # one distinct image, so every (offset, flip) gives a distinct crop
    img = torch.arange(36, dtype=torch.uint8).reshape(1, 1, 6, 6) + 1
    spec = CropFlip(padding=2, flip=True)
    batches = ResidentBatches(img, torch.zeros(1, dtype=torch.long), spec, torch.device("cpu"))
    seeds = torch.arange(200)
    x, _ = batches.batch(torch.zeros(200, dtype=torch.long), seeds)
    again, _ = batches.batch(torch.zeros(200, dtype=torch.long), seeds)
    assert torch.equal(x, again)
    # seed s and the same seed inside another batch give the same crop
    alone, _ = batches.batch(torch.zeros(1, dtype=torch.long), seeds[7:8])
    assert torch.equal(alone[0], x[7])
    # every one of the 5 x 5 offsets and both flips occur: 50 distinct crops
    assert len({t.numpy().tobytes() for t in x}) == 50
    # each crop is a window of the zero-padded image, flipped or not
    padded = torch.nn.functional.pad(img[0, 0].float() / 255, (2, 2, 2, 2))
    windows = {padded[r:r + 6, c:c + 6].numpy().tobytes() for r in range(5) for c in range(5)}
    windows |= {padded[r:r + 6, c:c + 6].flip(1).numpy().tobytes()
                for r in range(5) for c in range(5)}
    assert all(t[0].numpy().tobytes() in windows for t in x)


def test_no_flip_for_fashion_mnist(pattern_idx_dir):
    from deqguard.training.data import augmentation_for

    assert augmentation_for("fashion-mnist") == CropFlip(2, False)
    assert augmentation_for("cifar10") == CropFlip(4, True)


def test_resident_and_loader_pipelines_train_the_same_weights(pattern_idx_dir, tmp_path):
    """Without augmentation both pipelines feed the same batches in the same order, so one epoch
    of the tiny regulated run ends with the same weights whichever feeds it."""
    from test_training_run import tiny_config

    from deqguard.training.loop import Trainer

    weights = {}
    for pipeline in ("resident", "loader"):
        cfg = tiny_config(pattern_idx_dir, "data.augment=false", f"data.pipeline={pipeline}",
                          "train.epochs=1", "train.progress=false")
        trainer = Trainer(cfg, out_dir=tmp_path / pipeline, argv=["x"])
        assert (trainer.resident is not None) == (pipeline == "resident")
        trainer.run()
        weights[pipeline] = trainer.model.state_dict()
    assert all(torch.equal(v, weights["loader"][k]) for k, v in weights["resident"].items())
