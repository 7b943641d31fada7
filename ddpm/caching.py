"""Slice cache: build, verify and describe it (subjects are read by ``ddpm.nifti_inputs``).

The cache is the one artefact that later steps read (see ``meta.yaml``): a folder with

- ``{split}.npy``  (N, 2, H, W) float16, memory-mappable. This is the model's data space:
  channel 0 the image in [-1, 1], channel 1 the lesion mask encoded as -1 (background) / +1
  (lesion). ``x[n, c, i, j]`` is voxel (i, j, z_index) of the RAS-canonical grid after the
  in-plane resize: i increases toward the subject's right, j toward anterior, z toward
  superior (``meta.yaml`` holds the affine). Use ``np.rot90`` for a conventional display.
- ``{split}.csv``  one row per slice: subject, z_index, z_bin, pathology, token,
  lesion_voxels, source (the image file).
- ``priors.npz``   per z-bin mean head mask (in [0, 1]) and mean image of the training split.
- ``meta.yaml``    geometry, rules, splits, counts, rejected subjects, settings and their hash.

The rules that turn a NIfTI subject into slices (orientation, mask, intensity, in-plane
resize) are stated in ``ddpm.nifti_inputs``; subjects are split into train/val/test whole.
"""

from __future__ import annotations

import copy
import csv
import datetime
import hashlib
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from tqdm.auto import tqdm

import ddpm
from ddpm.conditioning import class_token, quantize_z_local
from ddpm.nifti_inputs import (
    HEAD_THRESHOLD_FRACTION,
    CacheError,
    DataWarning,
    prepare_subject,
    prepare_subjects,
    resolve_subjects,
)

CACHE_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("subject", "z_index", "z_bin", "pathology", "token", "lesion_voxels", "source")
KEEP_IN_MEMORY_BYTES = 1 << 30  # prepared slices kept between validation and writing
META_REQUIRED = ("format_version", "ddpm_version", "settings", "settings_hash", "z_range",
                 "n_bins", "image_size", "splits", "geometry")


class StaleCacheError(ValueError):
    """A cache that was built with settings other than the current configuration's."""


@dataclass
class CacheSummary:
    """What a build wrote: per split subjects/slices, per-bin class counts, rejected subjects."""

    cache_dir: Path
    n_bins: int
    splits: dict[str, dict]  # split -> {subjects, slices, lesion_slices}
    bin_counts: dict[str, list[list[int]]]  # split -> n_bins x [healthy, lesion]
    rejected: list[dict]
    warnings: list[str]

    def table(self) -> str:
        """Plain-text summary: slices per split and class, then per z-bin."""
        lines = [f"slice cache: {self.cache_dir}",
                 f"{'split':<6} {'subjects':>8} {'slices':>7} {'healthy':>8} {'lesion':>7}"]
        for name, s in self.splits.items():
            healthy = s["slices"] - s["lesion_slices"]
            lines.append(f"{name:<6} {s['subjects']:>8} {s['slices']:>7} {healthy:>8} "
                         f"{s['lesion_slices']:>7}")
        lines.append("slices per z-bin (healthy/lesion)")
        lines.append("bin  " + "".join(f"{name:>12}" for name in self.splits))
        for b in range(self.n_bins):
            cells = "".join(f"{'/'.join(map(str, self.bin_counts[n][b])):>12}"
                            for n in self.splits)
            lines.append(f"{b:<4} {cells}")
        if self.rejected:
            lines.append(f"rejected subjects ({len(self.rejected)}):")
            lines += [f"  {r['subject']}: {'; '.join(r['reasons'])}" for r in self.rejected]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- splits


def split_subjects(names: Sequence[str], fractions: Sequence[float], seed: int
                   ) -> dict[str, list[str]]:
    """Assign whole subjects to train/val/test: seeded shuffle of the sorted names, then cut.

    Sizes follow the fractions (largest remainder) with at least one subject in every split
    whose fraction is positive; fewer subjects than that is a ``CacheError``.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise CacheError(f"data.split_fractions={fractions}: expected three non-negative "
                         "numbers (train, val, test) that sum to 1")
    if fractions[0] == 0:
        raise CacheError("data.split_fractions: the train fraction must be positive")
    n, used = len(names), [f > 0 for f in fractions]
    if n < sum(used):
        wanted = ", ".join(s for s, u in zip(SPLITS, used, strict=True) if u)
        raise CacheError(f"fewer subjects than splits need: {n} usable subject(s), but the "
                         f"splits {wanted} need at least one each")
    ideal = [f * n for f in fractions]
    counts = [max(1, math.floor(x)) if u else 0 for x, u in zip(ideal, used, strict=True)]
    while sum(counts) > n:  # the forced minimum of 1 overshot: shrink the most over-served
        i = max((i for i in range(3) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])
        counts[i] -= 1
    while sum(counts) < n:  # hand out the remainder to the most under-served
        i = max((i for i in range(3) if used[i]), key=lambda i: ideal[i] - counts[i])
        counts[i] += 1
    order = sorted(names)
    np.random.default_rng(int(seed)).shuffle(order)
    cuts = np.cumsum([0] + counts)
    return {s: sorted(order[cuts[i]:cuts[i + 1]]) for i, s in enumerate(SPLITS)}


# ----------------------------------------------------------------------------- settings


def settings_value(value):
    """JSON-normal form (tuples -> lists, paths -> str) so config and YAML compare equal."""
    return json.loads(json.dumps(value, default=str))


def cache_settings(data_cfg) -> dict:
    """The data settings that determine a cache's contents (what ``verify_cache`` compares)."""
    s = {
        "source": str(data_cfg.source),
        "image_size": int(data_cfg.image_size),
        "z_range": [int(v) for v in data_cfg.z_range],
        "n_bins": int(data_cfg.n_bins),
        "split_fractions": [float(v) for v in data_cfg.split_fractions],
        "split_seed": int(data_cfg.split_seed),
        "clip_percentiles": [float(v) for v in data_cfg.clip_percentiles],
        "mask_threshold": float(data_cfg.mask_threshold),
        "lesion_min_voxels": int(data_cfg.lesion_min_voxels),
    }
    if s["source"] == "phantom":
        s.update(root=str(Path(data_cfg.root)), n_subjects=int(data_cfg.n_subjects),
                 phantom_size=int(data_cfg.phantom_size), phantom_seed=int(data_cfg.phantom_seed))
    elif s["source"] == "manifest":
        s["manifest"] = str(Path(data_cfg.manifest)) if data_cfg.manifest else None
    else:
        s.update(root=str(Path(data_cfg.root)), image_glob=str(data_cfg.image_glob),
                 mask_glob=str(data_cfg.mask_glob))
    return settings_value(s)


def settings_hash(settings: dict) -> str:
    """Short SHA-256 of the settings in canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_settings(data_cfg) -> None:
    lo, hi = (int(v) for v in data_cfg.z_range)
    if lo < 0 or hi < lo:
        raise CacheError(f"data.z_range=[{lo}, {hi}]: expected 0 <= low <= high (RAS z indices)")
    if hi - lo + 1 < int(data_cfg.n_bins):
        raise CacheError(f"data.z_range=[{lo}, {hi}] holds {hi - lo + 1} slices, fewer than "
                         f"data.n_bins={data_cfg.n_bins}")
    if int(data_cfg.image_size) < 1:
        raise CacheError(f"data.image_size={data_cfg.image_size}: expected a positive size")
    p_lo, p_hi = (float(v) for v in data_cfg.clip_percentiles)
    if not 0 <= p_lo < p_hi <= 100:
        raise CacheError(f"data.clip_percentiles=[{p_lo}, {p_hi}]: expected 0 <= lo < hi <= 100")
    split_subjects(["a", "b", "c"], data_cfg.split_fractions, 0)  # validates the fractions


def _with_overrides(data_cfg, manifest, out):
    cfg = copy.copy(data_cfg)
    if manifest is not None:
        cfg.source, cfg.manifest = "manifest", str(manifest)
    if out is not None:
        cfg.cache_dir = str(out)
    return cfg


# ----------------------------------------------------------------------------- meta


def load_meta(cache_dir: str | Path) -> dict:
    """Read and sanity-check a cache's ``meta.yaml`` (missing fields or format -> error)."""
    path = Path(cache_dir) / "meta.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no slice cache at {cache_dir} ({path.name} missing): "
                                "build it with: python cache.py --config <config.yaml>")
    meta = yaml.safe_load(path.read_text())
    missing = [k for k in META_REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise StaleCacheError(f"{path} lacks field(s) {missing}: damaged or written by another "
                              "ddpm version; rebuild with: python cache.py --config <config.yaml>")
    if meta["format_version"] != CACHE_FORMAT_VERSION:
        raise StaleCacheError(f"{path} has format_version {meta['format_version']} (ddpm "
                              f"{meta['ddpm_version']}); ddpm {ddpm.__version__} reads format "
                              f"{CACHE_FORMAT_VERSION}: rebuild with: python cache.py --config "
                              "<config.yaml>")
    return meta


def verify_cache(cache_dir: str | Path, data_cfg, config_path: str | Path | None = None) -> dict:
    """Return the cache's meta if it matches ``data_cfg``; else ``StaleCacheError`` naming
    every differing field (config value vs cache value) and the command that rebuilds it."""
    meta = load_meta(cache_dir)
    want, have = cache_settings(data_cfg), settings_value(meta["settings"])
    rebuild = f"python cache.py --config {config_path or '<config.yaml>'}"
    diffs = [f"  data.{k}: config {want.get(k, '(absent)')!r} vs cache {have.get(k, '(absent)')!r}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        raise StaleCacheError(f"slice cache {cache_dir} is stale: it was built with other data "
                              "settings:\n" + "\n".join(diffs) + f"\nRebuild it with: {rebuild}")
    absent = [f"{s}.{ext}" for s in meta["splits"] for ext in ("npy", "csv")
              if not (Path(cache_dir) / f"{s}.{ext}").is_file()]
    if absent:
        raise StaleCacheError(f"slice cache {cache_dir} lacks {absent}; rebuild it with: {rebuild}")
    return meta


def rounded_floats(a) -> list:
    """Nested lists of floats rounded to 6 decimals: arrays as ``meta.yaml`` records them."""
    return np.round(np.asarray(a, dtype=float), 6).tolist()


# ----------------------------------------------------------------------------- build


def _write_split(folder: Path, split: str, names, subjects, kept, cfg, priors, bar):
    """Write ``{split}.npy`` and ``{split}.csv``; returns per-subject meta and bin counts."""
    lo, hi = (int(v) for v in cfg.z_range)
    n_bins, size, n_z = int(cfg.n_bins), int(cfg.image_size), hi - lo + 1
    z_bins = np.array([quantize_z_local(z, (lo, hi), n_bins) for z in range(lo, hi + 1)])
    array = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(names) * n_z, 2, size, size))
    rows, counts, subject_meta = [], np.zeros((n_bins, 2), int), {}
    for k, name in enumerate(names):
        subject = subjects[name]
        prep = kept.pop(name, None) or prepare_subject(subject, cfg)
        array[k * n_z:(k + 1) * n_z, 0] = prep.image
        array[k * n_z:(k + 1) * n_z, 1] = np.where(prep.lesion, 1, -1)
        lesion_voxels = prep.lesion.sum(axis=(1, 2))
        for j, z in enumerate(range(lo, hi + 1)):
            pathology = int(lesion_voxels[j] >= int(cfg.lesion_min_voxels))
            rows.append((name, z, int(z_bins[j]), pathology,
                         int(class_token(int(z_bins[j]), pathology, n_bins)),
                         int(lesion_voxels[j]), str(subject.image)))
            counts[z_bins[j], pathology] += 1
        if priors is not None:  # z_bins is sorted: sum each bin's run of slices
            starts = np.flatnonzero(np.r_[True, z_bins[1:] != z_bins[:-1]])
            priors["head_mask"] += np.add.reduceat(prep.head, starts, axis=0, dtype=np.float64)
            priors["image"] += np.add.reduceat(prep.image, starts, axis=0, dtype=np.float64)
            priors["count"] += np.bincount(z_bins, minlength=n_bins)
        subject_meta[name] = {
            "split": split, "image": str(subject.image),
            "mask": str(subject.mask) if subject.mask else None,
            "pathology": subject.pathology, "affine": rounded_floats(prep.affine),
            "spacing_mm": rounded_floats(nib.affines.voxel_sizes(prep.affine)),
        }
        bar.update()
    array.flush()
    del array
    with (folder / f"{split}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    return subject_meta, counts


def _refuse_foreign_target(target: Path) -> None:
    if target.is_file() or (target.is_dir() and any(target.iterdir())
                            and not (target / "meta.yaml").is_file()):
        raise CacheError(f"cache_dir {target} exists and is not a slice cache (no meta.yaml): "
                         "refusing to replace it; choose another data.cache_dir or --out")


def move_into_place(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the complete ``tmp`` folder; the old cache goes only afterwards."""
    if not target.exists():
        tmp.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_cache(data_cfg, *, manifest=None, out=None, skip_bad: bool = False,
                progress: bool = True, log: Callable[[str], None] | None = None) -> CacheSummary:
    """Validate every subject, then write the slice cache to ``out`` (default data.cache_dir).

    Rejected subjects stop the build with one ``CacheError`` listing them all, unless
    ``skip_bad`` (they are then recorded in meta.yaml). Warnings are issued as ``DataWarning``.
    The cache is written to a temporary sibling folder and renamed into place when complete.
    """
    cfg = _with_overrides(data_cfg, manifest, out)
    _check_settings(cfg)
    target = Path(cfg.cache_dir)
    _refuse_foreign_target(target)
    subjects = resolve_subjects(cfg, progress=progress, log=log)
    if not subjects:
        raise CacheError(f"no subjects found for data.source={cfg.source!r}")
    checks, kept = prepare_subjects(subjects, cfg, progress, KEEP_IN_MEMORY_BYTES)
    rejected = [c for c in checks if c.status == "reject"]
    if rejected and not skip_bad:
        listing = "\n".join(f"  {c.subject.name}: {'; '.join(c.reasons)}" for c in rejected)
        raise CacheError(f"{len(rejected)} of {len(checks)} subjects rejected; nothing was "
                         f"written:\n{listing}\nFix them, or pass --skip-bad (skip_bad=True) to "
                         f"build from the {len(checks) - len(rejected)} good subjects.")
    notes = [f"{c.subject.name}: {r}" for c in checks if c.status == "warn" for r in c.reasons]
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    good = {c.subject.name: c.subject for c in checks if c.status != "reject"}
    splits = split_subjects(list(good), cfg.split_fractions, cfg.split_seed)

    n_bins, size = int(cfg.n_bins), int(cfg.image_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        priors = {"head_mask": np.zeros((n_bins, size, size)),
                  "image": np.zeros((n_bins, size, size)), "count": np.zeros(n_bins)}
        subject_meta, split_meta, bin_counts = {}, {}, {}
        with tqdm(total=len(good), desc="caching subjects", unit="subject",
                  disable=not progress) as bar:
            for split in SPLITS:
                names = splits[split]
                meta_s, counts = _write_split(tmp, split, names, good, kept, cfg,
                                              priors if split == "train" else None, bar)
                subject_meta.update(meta_s)
                bin_counts[split] = counts.tolist()
                split_meta[split] = {"subjects": names, "slices": int(counts.sum()),
                                     "lesion_slices": int(counts[:, 1].sum())}
        count = priors["count"][:, None, None]
        np.savez(tmp / "priors.npz", head_mask=(priors["head_mask"] / count).astype(np.float32),
                 image=(priors["image"] / count).astype(np.float32),
                 count=priors["count"].astype(np.int64))
        reference = splits["train"][0]
        settings = cache_settings(cfg)
        rejected_meta = [{"subject": c.subject.name, "image": str(c.subject.image),
                          "mask": str(c.subject.mask), "reasons": c.reasons} for c in rejected]
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "ddpm_version": ddpm.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings_hash": settings_hash(settings),
            "settings": settings,
            "z_range": settings["z_range"], "n_bins": n_bins, "image_size": size,
            "array": {"layout": "(N, 2, H, W)", "dtype": "float16", "channels": ["image", "mask"],
                      "indexing": "x[n, c, i, j] = voxel (i, j, z_index) of the resized RAS grid"},
            "normalisation": {
                "range": [-1.0, 1.0], "clip_percentiles": settings["clip_percentiles"],
                "head_threshold_fraction": HEAD_THRESHOLD_FRACTION,
                "rule": "head = voxels > min + 0.1*(p99.9 - min); clip to the clip_percentiles "
                        "of head voxels, map linearly to [-1, 1]; NaN/Inf set to the minimum",
            },
            "mask_encoding": {
                "background": -1, "lesion": 1,
                "rule": f"lesion = mask value > {settings['mask_threshold']:g} (any positive "
                        "label of a multi-label mask); nearest-neighbour resize",
                "pathology": f"1 when a slice holds >= {settings['lesion_min_voxels']} lesion "
                             "pixels after the resize; token = z_bin + pathology * n_bins",
            },
            "geometry": {
                "orientation": "RAS (nibabel.as_closest_canonical)",
                "reference_subject": reference,
                "affine": subject_meta[reference]["affine"],
                "spacing_mm": subject_meta[reference]["spacing_mm"],
                "note": "affine of the padded, in-plane-resized grid; z is the canonical "
                        "z_index; per-subject affines under subjects",
            },
            "splits": split_meta,
            "bin_counts": bin_counts,
            "rejected": rejected_meta,
            "warnings": notes,
            "subjects": subject_meta,
        }
        (tmp / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheSummary(target, n_bins, {s: {"subjects": len(splits[s]),
                                             "slices": split_meta[s]["slices"],
                                             "lesion_slices": split_meta[s]["lesion_slices"]}
                                         for s in SPLITS},
                        bin_counts, rejected_meta, notes)


def ensure_cache(data_cfg, config_path: str | Path | None = None, progress: bool = True) -> Path:
    """The cache folder for ``data_cfg``: verified when present, built (and printed) when absent."""
    target = Path(data_cfg.cache_dir)
    if (target / "meta.yaml").is_file():
        verify_cache(target, data_cfg, config_path)
        return target
    _refuse_foreign_target(target)
    print(f"No slice cache at {target}: building it from data.source={data_cfg.source!r}.")
    summary = build_cache(data_cfg, progress=progress, log=print)
    print(summary.table())
    return target
