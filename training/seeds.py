"""Where every random draw of a training step comes from: seeds derived from the step's position.

Every random draw of step s of epoch e (batch order, per-sample augmentation, dropout masks,
attack start noise, regulated solver depth, Jacobian-term coin and probes) comes from generators
seeded by (seed, e, s, rank), so a run resumed at any step repeats an uninterrupted run exactly on
CPU (and up to non-deterministic kernels on GPU), without any RNG state in the resume file.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", epoch, step, rank)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little")
             for p in parts]
    state = np.random.SeedSequence([w & 0xFFFFFFFF for w in words] + [w >> 32 for w in words])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed) for one epoch, from batch `start` on.

    Global batch b is positions [b*B*W, (b+1)*B*W) of a permutation seeded by (seed, epoch);
    process r takes its B-slice of it. The last incomplete batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.b, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world_size
        self.steps = n // (batch_size * world_size)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx, aug in self.index_tensors():
            yield list(zip(idx.tolist(), aug.tolist(), strict=True))

    def index_tensors(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The same batches as (indices [B], augmentation seeds [B]) tensors."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.n, generator=g)
        aug = torch.randint(0, 2**62, (self.n,), generator=g)
        gb = self.b * self.world
        for step in range(self.start, self.steps):
            lo = step * gb + self.rank * self.b
            yield perm[lo:lo + self.b], aug[lo:lo + self.b]
