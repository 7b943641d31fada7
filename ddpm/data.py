"""Datasets over the slice cache written by :mod:`ddpm.caching`.

The arrays are opened with ``np.load(mmap_mode="r")`` lazily, once per process, so a
``DataLoader`` with worker processes shares the page cache instead of copying the data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from ddpm.caching import INDEX_COLUMNS, StaleCacheError, load_meta


class SliceDataset(Dataset):
    """One split of a slice cache; item = dict of tensors.

    - ``x``: (2, H, W) float32, channel 0 the image in [-1, 1], channel 1 the mask in {-1, 1}
    - ``token``, ``z_bin``, ``pathology``: long scalars (``token = z_bin + pathology * n_bins``)
    - ``position``: float scalar, the slice's place in the z-range (0 at its low end, 1 at the top)
    - ``prior`` (only with ``with_prior``): (1, H, W) float32, the training split's mean head
      mask of the slice's z-bin mapped from [0, 1] to [-1, 1]
    """

    def __init__(self, cache_dir: str | Path, split: str, with_prior: bool = False):
        self.cache_dir = Path(cache_dir)
        self.split = split
        self.meta = load_meta(self.cache_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"split {split!r} not in cache {cache_dir}: it holds "
                             f"{list(self.meta['splits'])}")
        self.array_path = self.cache_dir / f"{split}.npy"
        self.index = _read_index(self.cache_dir / f"{split}.csv")
        size = int(self.meta["image_size"])
        shape = _npy_shape(self.array_path)
        if shape != (len(self.index["token"]), 2, size, size):
            raise StaleCacheError(f"{self.array_path} has shape {shape} but its index holds "
                                  f"{len(self.index['token'])} slices of 2x{size}x{size}: the "
                                  "cache is damaged; rebuild it with python cache.py")
        self.tokens = torch.as_tensor(self.index["token"], dtype=torch.long)
        self.z_bins = torch.as_tensor(self.index["z_bin"], dtype=torch.long)
        self.pathology = torch.as_tensor(self.index["pathology"], dtype=torch.long)
        # Continuous position in the z-range, for the sinusoidal z-position conditioning.
        lo, hi = (int(v) for v in self.meta["z_range"])
        z = torch.as_tensor(self.index["z_index"], dtype=torch.float32)
        self.positions = (z - lo) / max(hi - lo, 1)
        self.prior = None
        if with_prior:
            with np.load(self.cache_dir / "priors.npz") as priors:
                head = torch.from_numpy(priors["head_mask"].astype(np.float32))
            self.prior = (head * 2 - 1)[:, None]  # (n_bins, 1, H, W) in [-1, 1]
        self._array = None
        self._array_pid = None

    def __len__(self) -> int:
        return len(self.tokens)

    def _slices(self) -> np.ndarray:
        # Opened on first use in each process: workers never receive a pickled memmap and
        # each maps the file itself, so all of them share the OS page cache.
        if self._array is None or self._array_pid != os.getpid():
            self._array = np.load(self.array_path, mmap_mode="r")
            self._array_pid = os.getpid()
        return self._array

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"], state["_array_pid"] = None, None
        return state

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self._slices()[i], dtype=np.float32))  # (2, H, W)
        item = {"x": x, "token": self.tokens[i], "z_bin": self.z_bins[i],
                "pathology": self.pathology[i], "position": self.positions[i]}
        if self.prior is not None:
            item["prior"] = self.prior[self.z_bins[i]]
        return item


def _npy_shape(path: Path) -> tuple:
    if not path.is_file():
        raise StaleCacheError(f"{path} missing: the cache is incomplete; rebuild it")
    return tuple(np.load(path, mmap_mode="r").shape)


def _read_index(path: Path) -> dict[str, list]:
    if not path.is_file():
        raise StaleCacheError(f"{path} missing: the cache is incomplete; rebuild it")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StaleCacheError(f"{path} lacks column(s) {missing}; rebuild the cache")
        rows = list(reader)
    index = {c: [r[c] for r in rows] for c in ("subject", "source")}
    for c in ("z_index", "z_bin", "pathology", "token", "lesion_voxels"):
        index[c] = [int(r[c]) for r in rows]
    return index


def lesion_sampler(dataset: SliceDataset, oversample: float, generator: torch.Generator | None
                   = None, seed: int | None = None, num_samples: int | None = None
                   ) -> WeightedRandomSampler:
    """Sampler (with replacement) drawing lesion slices ``oversample`` times as often as
    healthy ones; ``oversample=1`` is uniform. ``seed`` makes a generator when none is given."""
    if not oversample > 0:
        raise ValueError(f"data.oversample_lesions={oversample}: expected a positive factor")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    weights = torch.where(dataset.pathology == 1, float(oversample), 1.0).double()
    return WeightedRandomSampler(weights, num_samples or len(dataset), replacement=True,
                                 generator=generator)
