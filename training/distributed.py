"""Data parallelism under torchrun: one process per device, gradients averaged after backward.

    torchrun --nproc_per_node=2 -m deqguard.cli train --preset ...   (gloo on CPU, nccl on CUDA)

Each process trains on its own shard of every global batch and all processes all-reduce their
gradients before the optimizer step, so they hold the same weights throughout. This is the
contract of DistributedDataParallel without its wrapper: one training step here runs several
forwards (attack steps, clean and adversarial forwards, the Jacobian term), which DDP's reducer
does not support before a single backward. BatchNorm statistics (ResNet-18 only) stay per process;
rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_parameters(model: nn.Module) -> None:
    """Start every process from rank 0's weights and buffers."""
    if not active():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def average_gradients(model: nn.Module) -> None:
    """All-reduce the gradients as one flat buffer, divided by the number of processes."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def check_in_sync(model: nn.Module) -> None:
    """Fail loudly if the processes' parameters diverged (they must stay bit-identical)."""
    if not active():
        return
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(ref, flat):
        from ..models.errors import DeqguardError
        raise DeqguardError(f"process {dist.get_rank()} holds different weights than process 0: "
                            "data-parallel training went out of sync")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if active():
        dist.barrier()
