"""Where a training process runs: its device, its place in a DDP job, its data order, and
how it reuses freed memory on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest allocation ``reuse_freed_memory`` keeps in the heap. Every activation of the
# benchmark models (at most about 40 MiB) fits, and they train as fast as with a 1 GiB limit; at
# larger sizes the biggest tensors get fresh pages again, which keeps the heap's gaps small:
# peak RSS 2058 against 2519 MiB for the 3D model at 64^3 and 2949 against 3249 MiB for the
# 2D one at 128^2, at the same step times (alternated processes, one-off probes; bench/README).
# 32 MiB gave up a tenth of the speed at those sizes.
REUSED_ALLOCATION_BYTES = 64 << 20


def reuse_freed_memory(device: torch.device | None = None) -> bool:
    """Keep memory this process frees for its next allocations (glibc malloc), for work on
    ``device`` (None: the CPU); a GPU device changes nothing.

    By default glibc serves large allocations with fresh pages from the kernel and hands freed
    ones back, so every activation-sized tensor of a CPU training step is zero-filled by the
    kernel page by page on first touch: 40-60 thousand page faults and about 0.1 s of system
    time per step of the 2D benchmark model, and an out-of-place elementwise op on a 16 MiB
    tensor takes 3-4x as long as one into a reused buffer. With the mmap and trim thresholds
    raised, allocations up to ``REUSED_ALLOCATION_BYTES`` come from the heap and freed memory
    stays there for the next step. The cost is peak resident memory, which the heap keeps as
    it grew, gaps between its blocks included. A kernel that reads memory it never wrote then
    sees old values rather than the kernel's zeros; the one such case found (a oneDNN bf16
    weight gradient) is avoided in ``ddpm.convolutions``. Returns whether the setting took
    (False for a GPU, or where the C library has no ``mallopt``).
    """
    if device is not None and device.type != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSED_ALLOCATION_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


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
