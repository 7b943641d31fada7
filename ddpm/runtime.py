"""Where a training process runs: its device, its place in a DDP job, and its data order."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` process group when launched by it (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and info.active:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EpochSampler(Sampler):
    """Indices of one epoch for this rank: a pure function of (seed, epoch), minus a skip.

    Uniform shuffling, or lesion over-sampling by drawing with replacement with weights
    ``oversample`` for lesion slices and 1 otherwise. The permutation is split across ranks
    the way ``DistributedSampler`` does it (padded to equal length, then rank::world).
    """

    def __init__(self, pathology, seed: int, oversample: float, dist_info: Dist):
        self.pathology = torch.as_tensor(pathology)
        self.seed, self.oversample, self.dist = seed, oversample, dist_info
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(len(self.pathology) / dist_info.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and skip its first ``skip`` samples (for resuming)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        n = len(self.pathology)
        if self.oversample != 1.0:
            weights = torch.where(self.pathology == 1, self.oversample, 1.0).double()
            order = torch.multinomial(weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        total = self.per_rank * self.dist.world_size
        order = torch.cat([order, order[: total - n]])  # pad so every rank gets per_rank
        mine = order[self.dist.rank :: self.dist.world_size]
        return iter(mine[self.skip :].tolist())
