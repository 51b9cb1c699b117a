"""Training batches cut from a split held whole on the device, augmented a batch at a time.

A DataLoader builds a batch image by image in Python: about 40 ms per batch of 128 on this
project's CPU, more than a training step of the anchor CNN takes. Fashion-MNIST and CIFAR-10 fit
in memory as uint8 (47 MB and 150 MB), so the whole split sits on the training device once and a
batch is one gather. The random crop and flip of each sample come from its augmentation seed
(`EpochBatches`), as in the per-sample pipeline, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import CropFlip


class ResidentBatches:
    """Images and labels of one split on `device`; `batch(idx, seeds)` gives (x float, y)."""

    def __init__(self, images: Tensor, labels: Tensor, augment: CropFlip | None,
                 device: torch.device):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [N,C,H,W], got {images.dtype} "
                             f"{list(images.shape)}")
        self.augment = augment
        self.height, self.width = int(images.shape[-2]), int(images.shape[-1])
        pad = augment.padding if augment else 0
        # zero padding once for the whole split, as RandomCrop(padding=p) pads each image
        self.images = F.pad(images, (pad, pad, pad, pad)).to(device)
        self.labels = labels.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """The samples at `indices`, each cropped (and flipped) as its seed says."""
        idx = indices.to(self.device)
        a = self.augment
        h, w = self.height, self.width
        rows = torch.arange(h, device=self.device).expand(len(idx), h)
        cols = torch.arange(w, device=self.device).expand(len(idx), w)
        if a is not None:
            # offsets and flip are digits of the sample's seed: uniform, and batch-independent
            span = 2 * a.padding + 1
            s = seeds.to(self.device)
            rows = rows + (s % span)[:, None]
            cols = cols + (s // span % span)[:, None]
            if a.flip:
                flip = (s // (span * span) % 2).bool()
                cols = torch.where(flip[:, None], cols.flip(1), cols)
        x = self.images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
        return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(), self.labels[idx]

    def epoch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for indices, seeds in batches:
            yield self.batch(indices, seeds)
