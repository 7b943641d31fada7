"""Dose-prediction datasets over the dose cache written by :mod:`ddpm.dose_cache`.

``DosePatchDataset`` draws random training patches (biased towards the PTVs);
``DoseVolumeDataset`` gives whole patients for evaluation. Arrays are in model space: see
``ddpm.dose_cache`` for the layout and ``dose_to_gy`` for the way back to Gy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddpm.caching import StaleCacheError
from ddpm.dose_cache import load_dose_meta, ptv_names

PAD_VALUE = -1.0  # patch padding in model space: -1 is air for the CT, outside for masks, 0 Gy


class _PatientArrays:
    """Lazily memory-mapped arrays of a split's patients (opened once per process)."""

    def __init__(self, cache_dir: str | Path, split: str):
        self.cache_dir = Path(cache_dir)
        self.meta = load_dose_meta(self.cache_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"split {split!r} not in dose cache {cache_dir}: it holds "
                             f"{list(self.meta['splits'])}")
        self.split = split
        self.names = list(self.meta["splits"][split]["patients"])
        self.structures = list(self.meta["structures"])
        self.shapes = [tuple(self.meta["patients"][n]["shape"]) for n in self.names]
        self._open: dict = {}

    def array(self, k: int, kind: str) -> np.ndarray:
        key = (k, kind)
        if key not in self._open:
            path = self.cache_dir / self.meta["patients"][self.names[k]]["files"][kind]
            if not path.is_file():
                raise StaleCacheError(f"{path} missing: the dose cache is incomplete; rebuild it")
            self._open[key] = np.load(path, mmap_mode="r")
        return self._open[key]

    def __getstate__(self):
        # Workers map the files themselves instead of receiving pickled memory maps.
        return {**self.__dict__, "_open": {}}


class DosePatchDataset(Dataset):
    """Random training patches of one split; item = dict of float32 tensors.

    - ``anatomy`` (1 + S, P, P, P): CT and structure channels; ``dose`` (1, P, P, P).

    Item i is drawn with ``np.random.default_rng([seed, i])`` alone: the same (seed, i) always
    gives the same patch, whatever the batch, worker or order (so training resumes exactly).
    A uniformly chosen patient; with probability ``ptv_fraction`` a patch centred on a random
    PTV voxel (moved inward to stay inside the volume), else (or when the patient has no PTV
    voxel) a uniform position. ``patch_size`` is an int (cube) or three sizes. Axes shorter
    than the patch are padded on both sides with -1 (air, outside every mask, 0 Gy).
    ``samples_per_epoch`` defaults to the sum over patients of ceil(voxels / patch voxels).
    """

    def __init__(self, cache_dir: str | Path, split: str, patch_size: int,
                 ptv_fraction: float = 0.5, samples_per_epoch: int | None = None, seed: int = 0):
        self.data = _PatientArrays(cache_dir, split)
        if not self.data.names:
            raise ValueError(f"split {split!r} of dose cache {cache_dir} holds no patient")
        if not 0.0 <= ptv_fraction <= 1.0:
            raise ValueError(f"ptv_fraction must be in [0, 1], got {ptv_fraction}")
        sizes = [patch_size] * 3 if isinstance(patch_size, int) else list(patch_size)
        self.patch = tuple(int(p) for p in sizes)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch_size must be a positive int or 3 sizes, got {patch_size}")
        self.ptv_fraction, self.seed = float(ptv_fraction), int(seed)
        names = self.data.structures
        self.ptv_channels = [1 + names.index(s) for s in ptv_names(names)]  # in the masks file
        if samples_per_epoch is None:
            samples_per_epoch = sum(math.ceil(math.prod(s) / math.prod(self.patch))
                                    for s in self.data.shapes)
        self.samples_per_epoch = int(samples_per_epoch)
        self._ptv_voxels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def ptv_voxels(self, k: int) -> np.ndarray:
        """Flat indices of patient k's PTV voxels (union of all PTVs)."""
        if k not in self._ptv_voxels:
            masks = self.data.array(k, "masks")
            union = np.zeros(self.data.shapes[k], dtype=bool)
            for c in self.ptv_channels:
                union |= masks[c]
            self._ptv_voxels[k] = np.flatnonzero(union)
        return self._ptv_voxels[k]

    def patch_start(self, i: int) -> tuple[int, tuple[int, ...]]:
        """(patient index, patch corner) of item i; the corner may be 0 on short axes."""
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.integers(len(self.data.names)))
        shape = self.data.shapes[k]
        room = [max(n - p, 0) for n, p in zip(shape, self.patch, strict=True)]
        if rng.random() < self.ptv_fraction and self.ptv_voxels(k).size:
            voxels = self.ptv_voxels(k)
            centre = np.unravel_index(voxels[rng.integers(voxels.size)], shape)
            start = [min(max(int(c) - p // 2, 0), r)
                     for c, p, r in zip(centre, self.patch, room, strict=True)]
        else:
            start = [int(rng.integers(r + 1)) for r in room]
        return k, tuple(start)

    def crop(self, array: np.ndarray, start) -> np.ndarray:
        """(C, *patch) float32 window of (C, X, Y, Z) ``array`` at ``start``, padded with -1."""
        out = np.full((array.shape[0], *self.patch), PAD_VALUE, dtype=np.float32)
        src, dst = [slice(None)], [slice(None)]
        for n, p, a in zip(array.shape[1:], self.patch, start, strict=True):
            if n >= p:
                src.append(slice(a, a + p))
                dst.append(slice(0, p))
            else:
                src.append(slice(0, n))
                dst.append(slice((p - n) // 2, (p - n) // 2 + n))
        out[tuple(dst)] = array[tuple(src)]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"patch index {i} out of range 0..{len(self) - 1}")
        k, start = self.patch_start(i)
        return {"anatomy": torch.from_numpy(self.crop(self.data.array(k, "anatomy"), start)),
                "dose": torch.from_numpy(self.crop(self.data.array(k, "dose"), start))}


class DoseVolumeDataset(Dataset):
    """Whole patients of one split, for evaluation; item = dict:

    ``anatomy`` (1 + S, X, Y, Z) and ``dose`` (1, X, Y, Z) float32 tensors (model space; see
    :func:`ddpm.dose_cache.dose_to_gy`), ``body`` (X, Y, Z) and ``structures``
    {name: (X, Y, Z)} bool arrays, ``patient`` (str), ``spacing_mm`` (3 floats), ``affine``
    (4, 4) RAS affine of the grid.
    """

    def __init__(self, cache_dir: str | Path, split: str):
        self.data = _PatientArrays(cache_dir, split)
        self.meta = self.data.meta
        self.dose_scale_gy = float(self.meta["normalisation"]["dose_scale_gy"])

    def __len__(self) -> int:
        return len(self.data.names)

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(f"patient index {k} out of range 0..{len(self) - 1}")
        masks = np.array(self.data.array(k, "masks"))  # (1 + S, X, Y, Z) bool, a copy
        name = self.data.names[k]
        return {
            "anatomy": torch.from_numpy(np.array(self.data.array(k, "anatomy"))),
            "dose": torch.from_numpy(np.array(self.data.array(k, "dose"))),
            "body": masks[0],
            "structures": {s: masks[1 + j] for j, s in enumerate(self.data.structures)},
            "patient": name,
            "spacing_mm": list(self.meta["spacing_mm"]),
            "affine": np.asarray(self.meta["patients"][name]["affine"]),
        }
