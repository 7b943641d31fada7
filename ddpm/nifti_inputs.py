"""NIfTI subjects -> validated, RAS-canonical, normalised slices ready for the slice cache.

Finds the subjects (a manifest, a folder glob pair or the phantom set), reads and validates
each subject's image and mask, and converts them to the slices ``ddpm.caching`` writes.

Rules (the same ones the README states):

- Orientation: every volume is reoriented to the closest canonical RAS orientation
  (``nibabel.as_closest_canonical``); slices are taken along the third (inferior->superior)
  axis. Oblique volumes are not resampled, only reordered (a warning says so).
- Mask: lesion = mask value > ``mask_threshold``. Multi-label or soft masks are accepted with
  a warning (so with the default 0.5 every positive label is lesion); negative or non-finite
  mask values reject the subject. A blank mask cell in a manifest means "no lesion".
- Intensity: the head is the set of voxels above ``min + 0.1 * (p99.9 - min)`` of the volume;
  the image is clipped to the ``clip_percentiles`` of the head voxels and mapped linearly to
  [-1, 1] (so the background is -1). NaN/Inf image voxels are repaired (set to the volume's
  finite minimum) with a warning.
- In-plane: the slab is padded (value -1) to a square physical field of view, then resized
  to ``image_size`` with ``F.interpolate`` (area when shrinking, bilinear otherwise, nearest
  for masks); anisotropic voxels therefore keep their true aspect ratio.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HEAD_THRESHOLD_FRACTION = 0.1  # head = voxels above min + 0.1 * (p99.9 - min)
AFFINE_TOLERANCE_VOXELS = 0.1  # image and mask grids may differ by 10% of a voxel
OBLIQUE_WARN_DEGREES = 0.5
PREPARE_THREADS = min(8, os.cpu_count() or 1)

class CacheError(ValueError):
    """Input that stops a cache build (rejected subjects, too few subjects, bad settings)."""


class DataWarning(UserWarning):
    """An input that was accepted but repaired or interpreted (NaN voxels, multi-label mask)."""


class SubjectRejected(Exception):
    """One subject cannot be cached (or cannot be read); the message says which file and why."""


@dataclass(frozen=True)
class Subject:
    """One subject's input files; ``mask=None`` means no lesion; ``problem`` a lookup error."""

    name: str
    image: Path | None
    mask: Path | None
    pathology: str = ""
    problem: str = ""


@dataclass
class SubjectCheck:
    """Validation result for one subject: status ``ok``, ``warn`` or ``reject`` and why."""

    subject: Subject
    status: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class PreparedSubject:
    """A subject's cached slices: image (Z, S, S) in [-1, 1], lesion and head masks (bool)."""

    image: np.ndarray
    lesion: np.ndarray
    head: np.ndarray
    affine: np.ndarray  # (4, 4) RAS affine of the resized grid
    warnings: list[str]

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.lesion.nbytes + self.head.nbytes


# ----------------------------------------------------------------------------- inputs


def read_manifest(path: str | Path) -> list[Subject]:
    """Subjects of a CSV with columns ``subject,image,mask[,pathology]``.

    Relative paths are relative to the manifest's folder; a blank mask means no lesion.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"manifest {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("subject", "image", "mask") if c not in columns]
        if missing:
            raise CacheError(f"manifest {path} lacks column(s) {missing}: found {columns}, "
                             "expected subject,image,mask[,pathology]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    subjects, first_row = [], {}
    for line, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        name = row["subject"]
        if not name:
            raise CacheError(f"manifest {path} line {line}: empty subject name")
        if name in first_row:
            raise CacheError(f"manifest {path} line {line}: subject {name!r} already on line "
                             f"{first_row[name]}; subject names must be unique")
        first_row[name] = line
        image = path.parent / row["image"] if row["image"] else None
        mask = path.parent / row["mask"] if row["mask"] else None
        subjects.append(Subject(name, image, mask, row.get("pathology", ""),
                                "" if image else "no image path in the manifest"))
    return subjects


def _glob_regex(pattern: str) -> re.Pattern:
    """Regex for a glob that captures what each wildcard matched (the subject key)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + "(.*)", i + 2
        elif pattern[i] == "*":
            out, i = out + "([^/]*)", i + 1
        elif pattern[i] == "?":
            out, i = out + "([^/])", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out, i = out + "([" + ("^" + body[1:] if body.startswith("!") else body) + "])", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _files_by_key(root: Path, pattern: str) -> dict[tuple, Path]:
    regex, found = _glob_regex(pattern), {}
    for path in sorted(root.glob(pattern)):
        match = regex.match(path.relative_to(root).as_posix())
        if match and path.is_file():
            found[match.groups()] = path
    return found


def find_folder_subjects(root: str | Path, image_glob: str, mask_glob: str) -> list[Subject]:
    """Pair ``root/image_glob`` with ``root/mask_glob`` by subject: the text the wildcards match.

    E.g. ``images/*_t1.nii.gz`` and ``labels/*_seg.nii.gz`` pair ``sub01_t1`` with ``sub01_seg``.
    """
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"data.root {root} is not a folder")
    images, masks = _files_by_key(root, image_glob), _files_by_key(root, mask_glob)
    if not images:
        raise CacheError(f"no image matches data.image_glob {image_glob!r} under {root}")
    subjects = []
    for key in sorted(set(images) | set(masks)):
        name = "_".join(dict.fromkeys(k for k in key if k)) or "subject"
        image, mask = images.get(key), masks.get(key)
        problem = ""
        if image is None:
            problem = f"mask {mask} has no image matching data.image_glob {image_glob!r}"
        elif mask is None:
            problem = (f"no mask matches data.mask_glob {mask_glob!r} (list healthy subjects "
                       "in a manifest with a blank mask)")
        subjects.append(Subject(name, image, mask, "", problem))
    return subjects


def _phantom_manifest(data_cfg, progress: bool, log: Callable[[str], None]) -> Path:
    """The phantom set's manifest, generated first when ``data.root`` holds none."""
    from ddpm.phantoms import generate_brain_phantoms

    root = Path(data_cfg.root)
    if not (root / "manifest.csv").is_file():
        log(f"Generating {data_cfg.n_subjects} phantom subjects "
            f"({data_cfg.phantom_size}^3, seed {data_cfg.phantom_seed}) into {root}")
    try:  # returns the existing set when it was made with these settings
        return Path(generate_brain_phantoms(root, n_subjects=int(data_cfg.n_subjects),
                                            size=int(data_cfg.phantom_size),
                                            seed=int(data_cfg.phantom_seed), progress=progress))
    except FileExistsError as exc:
        raise CacheError(f"data.root: {exc}") from None


def resolve_subjects(data_cfg, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> list[Subject]:
    """The configured subjects: from ``data.manifest``, a folder glob pair or phantoms.

    ``source: phantom`` generates the phantom set into ``data.root`` when it is absent.
    """
    log = log or (lambda message: None)
    source = data_cfg.source
    if source == "phantom":
        return read_manifest(_phantom_manifest(data_cfg, progress, log))
    if source == "manifest":
        if not data_cfg.manifest:
            raise CacheError("data.source is 'manifest' but data.manifest is not set")
        return read_manifest(data_cfg.manifest)
    if source == "folder":
        return find_folder_subjects(data_cfg.root, data_cfg.image_glob, data_cfg.mask_glob)
    raise CacheError(f"data.source={source!r}: expected 'phantom', 'manifest' or 'folder'")


# ----------------------------------------------------------------------------- one volume


def load_canonical(path: Path | None, role: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, Y, Z) float32 data and affine in closest-canonical RAS; scaling applied."""
    if path is None or not Path(path).is_file():
        raise SubjectRejected(f"{role} file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise SubjectRejected(f"{role} {path} is not a readable NIfTI file "
                              f"({type(exc).__name__}: {exc})") from None
    shape = img.shape
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise SubjectRejected(f"{role} {path} is a 4D series of shape {shape} "
                              f"({math.prod(shape[3:])} volumes); expected one 3D volume")
    if len(shape) < 3:
        raise SubjectRejected(f"{role} {path} has shape {shape}; expected a 3D volume")
    try:
        img = nib.as_closest_canonical(nib.funcs.squeeze_image(img))
        data = img.get_fdata(dtype=np.float32)  # applies scl_slope/scl_inter, any byte order
    except Exception as exc:
        raise SubjectRejected(f"{role} {path} is truncated or unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    notes = []
    oblique = float(np.degrees(np.max(nib.affines.obliquity(img.affine))))
    if oblique > OBLIQUE_WARN_DEGREES:
        notes.append(f"{role} {path} is oblique ({oblique:.1f} deg): slices follow the voxel "
                     "grid, reordered to the nearest RAS axes but not resampled")
    return data, img.affine, notes


def grid_offset_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape) -> float:
    """Largest distance between the two grids' positions of the volume's 8 corner voxels."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1)
                        for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    return float(np.abs((affine_a - affine_b) @ corners).max())


def binarise_mask(mask: np.ndarray, threshold: float, path) -> tuple[np.ndarray, list[str]]:
    """lesion = mask > threshold; notes for multi-label/soft masks; reject negative/NaN values."""
    if not np.isfinite(mask).all():
        raise SubjectRejected(f"mask {path} holds NaN/Inf values")
    if mask.min() < 0:
        raise SubjectRejected(f"mask {path} has negative labels (min {mask.min():g}); "
                              "expected 0 for background and positive labels for lesion")
    notes, positive = [], mask[mask != 0]
    if positive.size and not np.all(positive == 1):
        if np.all(positive == np.round(positive)):
            labels = ", ".join(f"{v:g}" for v in np.unique(positive)[:10])
            notes.append(f"mask {path} is multi-label (labels {labels}): "
                         f"every label > {threshold:g} counts as lesion")
        else:
            notes.append(f"mask {path} has non-integer values in [{positive.min():g}, "
                         f"{positive.max():g}]: lesion = value > {threshold:g}")
    return mask > threshold, notes


def normalise_intensity(volume: np.ndarray, clip_percentiles: Sequence[float]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Volume -> ([-1, 1] image, head mask): clip to head-voxel percentiles, map linearly.

    Head = voxels above ``min + HEAD_THRESHOLD_FRACTION * (p99.9 - min)``; the percentile
    p99.9 (not the max) keeps a few hot voxels from moving the threshold.
    """
    low = float(volume.min())
    top = float(np.percentile(volume, 99.9))
    if top <= low:
        top = float(volume.max())
    head = volume > low + HEAD_THRESHOLD_FRACTION * (top - low)
    p_lo, p_hi = (float(v) for v in np.percentile(volume[head], list(clip_percentiles)))
    if p_hi <= p_lo:
        raise SubjectRejected(f"no intensity contrast inside the head (percentiles "
                              f"{list(clip_percentiles)} both equal {p_lo:g})")
    image = (np.clip(volume, p_lo, p_hi) - p_lo) * (2.0 / (p_hi - p_lo)) - 1.0
    return image.astype(np.float32), head


def _resize(slices: np.ndarray, size: int, kind: str) -> np.ndarray:
    """(Z, X, Y) -> (Z, size, size): area when shrinking, bilinear otherwise, nearest for masks."""
    if slices.shape[1:] == (size, size):
        return slices
    t = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]  # (Z, 1, X, Y)
    if kind == "mask":
        t = F.interpolate(t, size=(size, size), mode="nearest-exact")
    elif size <= min(slices.shape[1:]):
        t = F.interpolate(t, size=(size, size), mode="area")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    return t[:, 0].numpy()


def _square_padding(shape_xy, spacing_xy) -> tuple[tuple[int, int], tuple[int, int]]:
    """Voxels to pad before/after on x and y so both axes span the same physical extent."""
    extent = max(n * d for n, d in zip(shape_xy, spacing_xy, strict=True))
    pads = []
    for n, d in zip(shape_xy, spacing_xy, strict=True):
        total = max(int(round(extent / d)) - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads[0], pads[1]


def prepare_subject(subject: Subject, data_cfg) -> PreparedSubject:
    """Load, validate and convert one subject to cache slices (raises on a rejected subject)."""
    if subject.problem:
        raise SubjectRejected(subject.problem)
    volume, affine, notes = load_canonical(subject.image, "image")
    finite = np.isfinite(volume)
    if not finite.all():
        if not finite.any():
            raise SubjectRejected(f"image {subject.image} has no finite voxel")
        fill = float(volume[finite].min())
        notes.append(f"image {subject.image}: {int((~finite).sum())} NaN/Inf voxels set to the "
                     f"volume minimum {fill:g}")
        volume = np.where(finite, volume, np.float32(fill))
    if volume.max() == volume.min():
        value = float(volume.flat[0])
        raise SubjectRejected(f"image {subject.image} is "
                              + ("all zeros" if value == 0 else f"constant ({value:g})"))
    if subject.mask is None:
        lesion = np.zeros(volume.shape, bool)
    else:
        mask, mask_affine, mask_notes = load_canonical(subject.mask, "mask")
        notes += mask_notes
        if mask.shape != volume.shape:
            raise SubjectRejected(f"image {subject.image} and mask {subject.mask} differ in shape "
                                  f"(RAS order): {volume.shape} vs {mask.shape}")
        spacing = nib.affines.voxel_sizes(affine)
        offset = grid_offset_mm(affine, mask_affine, volume.shape)
        if offset > AFFINE_TOLERANCE_VOXELS * float(spacing.min()):
            raise SubjectRejected(f"image {subject.image} and mask {subject.mask} affines "
                                  f"disagree: grids differ by up to {offset:.3g} mm (tolerance "
                                  f"{AFFINE_TOLERANCE_VOXELS:g} voxel)")
        lesion, mask_notes = binarise_mask(mask, float(data_cfg.mask_threshold), subject.mask)
        notes += mask_notes
    lo, hi = (int(v) for v in data_cfg.z_range)
    if hi >= volume.shape[2]:
        raise SubjectRejected(f"data.z_range [{lo}, {hi}] lies outside image {subject.image}: "
                              f"it has {volume.shape[2]} slices along z (RAS), "
                              f"indices 0..{volume.shape[2] - 1}")
    image, head = normalise_intensity(volume, data_cfg.clip_percentiles)
    slab = [np.moveaxis(a[:, :, lo:hi + 1], 2, 0) for a in (image, lesion, head)]  # (Z, X, Y)
    pad_x, pad_y = _square_padding(volume.shape[:2], nib.affines.voxel_sizes(affine)[:2])
    if any(pad_x + pad_y):
        slab = [np.pad(a, ((0, 0), pad_x, pad_y), constant_values=v)
                for a, v in zip(slab, (-1.0, False, False), strict=True)]
    size = int(data_cfg.image_size)
    padded_xy = slab[0].shape[1:]
    image = _resize(slab[0], size, "image")
    lesion = _resize(slab[1], size, "mask") > 0.5
    head = _resize(slab[2], size, "image") >= 0.5
    # Affine of the padded, resized grid: shift by the padding, then scale about voxel centres
    # (F.interpolate with align_corners=False maps new index j to old (j + 0.5) * s - 0.5).
    shift = np.eye(4)
    shift[:2, 3] = -pad_x[0], -pad_y[0]
    scale = np.eye(4)
    for axis, n in enumerate(padded_xy):
        s = n / size
        scale[axis, axis], scale[axis, 3] = s, (s - 1) / 2
    return PreparedSubject(image.astype(np.float16), lesion, head, affine @ shift @ scale, notes)


# ----------------------------------------------------------------------------- all subjects


def check_subjects(subjects: Sequence[Subject], data_cfg, progress: bool = False
                   ) -> list[SubjectCheck]:
    """Validate every subject (full read and conversion); one ``SubjectCheck`` each."""
    return prepare_subjects(subjects, data_cfg, progress, keep_bytes=0)[0]


def _try_prepare(subject: Subject, data_cfg) -> PreparedSubject | str:
    try:
        return prepare_subject(subject, data_cfg)
    except SubjectRejected as exc:
        return str(exc)


def prepare_subjects(subjects: Sequence[Subject], data_cfg, progress: bool = False,
                     keep_bytes: int = 0) -> tuple[list[SubjectCheck], dict[str, PreparedSubject]]:
    """Validate and prepare every subject (threads: gzip and numpy release the GIL).

    Returns one ``SubjectCheck`` per subject and, by name, the prepared subjects that fit in
    ``keep_bytes`` together (kept so a build need not read them twice).
    """
    checks, kept, used = [], {}, 0
    with ThreadPoolExecutor(max_workers=PREPARE_THREADS) as pool:
        results = pool.map(_try_prepare, subjects, [data_cfg] * len(subjects))
        for subject, prepared in zip(subjects, tqdm(results, total=len(subjects),
                                     desc="checking subjects", unit="subject",
                                     disable=not progress), strict=True):
            if isinstance(prepared, str):
                checks.append(SubjectCheck(subject, "reject", [prepared]))
                continue
            checks.append(SubjectCheck(subject, "warn" if prepared.warnings else "ok",
                                       list(prepared.warnings)))
            if used + prepared.nbytes <= keep_bytes:
                kept[subject.name], used = prepared, used + prepared.nbytes
    return checks, kept

