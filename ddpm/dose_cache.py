"""Dose-prediction cache: NIfTI patients -> validated, resampled, normalised per-patient arrays.

Input: a manifest CSV ``patient,ct,dose,<structure>...`` (paths relative to the manifest);
every extra column is a structure (uint8 mask), names starting with "PTV" are targets.

The cache folder (``meta.yaml`` records everything below):

- ``patients/{stem}_anatomy.npy`` (1 + S, X, Y, Z) float32: channel 0 the CT, clipped to
  ``ct_window`` HU and mapped linearly to [-1, 1]; then one channel per structure, -1 outside
  and +1 inside (the order of ``meta["structures"]``).
- ``patients/{stem}_dose.npy`` (1, X, Y, Z) float32: the dose, ``gy_to_dose``: 0 Gy -> -1,
  ``dose_scale_gy`` -> +1 (not clipped, so ``dose_to_gy`` gives the Gy back exactly).
- ``patients/{stem}_masks.npy`` (1 + S, X, Y, Z) bool: the body, then every structure.

Geometry: every volume is reordered to the closest canonical RAS orientation
(``nibabel.as_closest_canonical``), then resampled to the common ``spacing_mm`` (trilinear for
CT and dose, nearest for masks) on a grid centred on the original field of view with
round(n * d / d') voxels per axis. ``x[c, i, j, k]`` is voxel (i, j, k) of that grid: i increases
toward the patient's right, j toward anterior, k toward superior (affines in ``meta.yaml``).

Body: a structure named body/external/skin when there is one, else CT > -500 HU united with
every structure, with the holes of each axial slice filled (lungs, airways, bowel gas).

The datasets over this cache are in ``ddpm.dose_data``; the settings (``cfg`` below) are the
``dose`` section of the config, ``ddpm.config.DoseDataConfig``.
"""

from __future__ import annotations

import csv
import datetime
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

import ddpm
from ddpm.caching import (
    SPLITS,
    StaleCacheError,
    move_into_place,
    rounded_floats,
    settings_hash,
    settings_value,
    split_subjects,
)
from ddpm.nifti_inputs import (
    AFFINE_TOLERANCE_VOXELS,
    CacheError,
    DataWarning,
    SubjectRejected,
    grid_offset_mm,
    load_canonical,
)

DOSE_CACHE_FORMAT_VERSION = 1
BODY_THRESHOLD_HU = -500.0  # between air (-1000) and fat (-100); lungs are filled as holes
BODY_NAMES = ("body", "external", "skin")  # a structure of this name is taken as the body
NEGATIVE_DOSE_TOLERANCE_GY = 0.01  # interpolation undershoot clipped to 0; below: rejected
_META_REQUIRED = ("format_version", "ddpm_version", "settings", "settings_hash", "spacing_mm",
                  "normalisation", "structures", "splits", "patients")


# ----------------------------------------------------------------------------- normalisation


def ct_to_model(hu, ct_window):
    """CT in HU -> model space: clip to [lo, hi] = ``ct_window``, map linearly to [-1, 1]."""
    lo, hi = (float(v) for v in ct_window)
    return (hu.clip(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def gy_to_dose(gy, dose_scale_gy: float):
    """Dose in Gy -> model space: 2 gy / scale - 1, so [0, scale] Gy maps to [-1, 1]."""
    return gy * (2.0 / float(dose_scale_gy)) - 1.0


def dose_to_gy(dose, dose_scale_gy: float):
    """Model space -> Gy, the inverse of :func:`gy_to_dose`: (dose + 1) scale / 2."""
    return (dose + 1.0) * (float(dose_scale_gy) / 2.0)


def ptv_names(structures) -> list[str]:
    """The target structures: names starting with "PTV" (the convention of ``ddpm.dose``)."""
    return [s for s in structures if s.startswith("PTV")]


# ----------------------------------------------------------------------------- one patient


@dataclass(frozen=True)
class DosePatient:
    """One manifest row: files of the CT, the dose and each structure (None = not contoured)."""

    name: str
    ct: Path | None
    dose: Path | None
    structures: dict[str, Path | None]


@dataclass
class PreparedPatient:
    """A patient on the common grid: CT (HU) and dose (Gy) float32, boolean masks."""

    ct_hu: np.ndarray  # (X, Y, Z)
    dose_gy: np.ndarray  # (X, Y, Z)
    structures: dict[str, np.ndarray]  # name -> (X, Y, Z) bool
    body: np.ndarray  # (X, Y, Z) bool
    affine: np.ndarray  # (4, 4) RAS affine of the resampled grid
    warnings: list[str]


def read_dose_manifest(path: str | Path) -> tuple[list[DosePatient], list[str]]:
    """Patients and structure names of a CSV ``patient,ct,dose,<structure>...``.

    Paths are relative to the manifest's folder; a blank structure cell means "not contoured"
    (an empty mask, with a warning at build time).
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"dose manifest {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
                for row in reader]  # cells beyond the header (key None) are ignored
    missing = [c for c in ("patient", "ct", "dose") if c not in columns]
    if missing:
        raise CacheError(f"dose manifest {path} lacks column(s) {missing}: found {columns}, "
                         "expected patient,ct,dose,<structure>...")
    structures = [c for c in columns if c not in ("patient", "ct", "dose")]
    if not structures or len(set(columns)) != len(columns):
        raise CacheError(f"dose manifest {path}: columns {columns} must name at least one "
                         "structure after patient,ct,dose, each column once")
    patients, first_line = [], {}
    for line, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        name = row["patient"]
        if not name or name in first_line:
            raise CacheError(f"dose manifest {path} line {line}: patient name {name!r} is "
                             + ("empty" if not name else f"already on line {first_line[name]}"))
        first_line[name] = line
        for column in ("ct", "dose"):
            if not row[column]:
                raise CacheError(f"dose manifest {path} line {line}: patient {name!r} has no "
                                 f"{column} file (column {column!r} is blank)")

        def file(column, row=row):
            return path.parent / row[column] if row.get(column) else None

        patients.append(DosePatient(name, file("ct"), file("dose"),
                                    {s: file(s) for s in structures}))
    if not patients:
        raise CacheError(f"dose manifest {path} lists no patient")
    return patients, structures


def _load(path, column: str, reference=None):
    """(X, Y, Z) float32 RAS data, affine, notes; checked against ``reference`` (data, affine)."""
    data, affine, notes = load_canonical(path, f"column {column!r}:")
    if reference is not None:
        ref_data, ref_affine, ref_path = reference
        if data.shape != ref_data.shape:
            raise SubjectRejected(f"column {column!r}: {path} has shape {data.shape} but the "
                                  f"CT {ref_path} has {ref_data.shape} (RAS order)")
        offset = grid_offset_mm(ref_affine, affine, data.shape)
        tolerance = AFFINE_TOLERANCE_VOXELS * float(nib.affines.voxel_sizes(ref_affine).min())
        if offset > tolerance:
            raise SubjectRejected(f"column {column!r}: {path} and the CT {ref_path} affines "
                                  f"disagree: grids differ by up to {offset:.3g} mm (tolerance "
                                  f"{AFFINE_TOLERANCE_VOXELS:g} voxel)")
    if not np.isfinite(data).all():
        raise SubjectRejected(f"column {column!r}: {path} holds {int((~np.isfinite(data)).sum())}"
                              " NaN/Inf voxels")
    return data, affine, notes


def resample_to_spacing(volume: np.ndarray, affine: np.ndarray, spacing_mm, kind: str = "linear"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Resample (X, Y, Z) or (C, X, Y, Z) ``volume`` to voxels of ``spacing_mm``.

    The new grid has n' = max(1, round(n d / d')) voxels per axis, centred on the old field
    of view, so its extent n' d' is within d' / 2 of the old n d. ``kind`` "linear"
    (trilinear) or "nearest" (masks), by ``F.grid_sample``; outside the old voxel centres
    the border value is repeated. Returns (volume, affine of the new grid).
    """
    old = nib.affines.voxel_sizes(affine)
    new = np.asarray(spacing_mm, dtype=float)
    if np.allclose(old, new, rtol=1e-5, atol=0):
        return volume, affine
    data = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    data = data[None] if data.ndim == 3 else data  # (C, X, Y, Z)
    sizes = data.shape[1:]
    ratio = new / old  # old voxels per new voxel
    new_sizes = [max(1, round(n * d / s)) for n, d, s in zip(sizes, old, new, strict=True)]
    offsets = [(n - 1) / 2 - (m - 1) / 2 * r for n, m, r in zip(sizes, new_sizes, ratio,
                                                                  strict=True)]
    axes = []
    for n, m, r, o in zip(sizes, new_sizes, ratio, offsets, strict=True):
        index = o + r * torch.arange(m, dtype=torch.float64)  # old voxel index of new voxels
        axes.append((2 * index / (n - 1) - 1 if n > 1 else index * 0).float())
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gz, gy, gx], dim=-1)[None]  # grid_sample wants (W, H, D) order
    mode = "nearest" if kind == "nearest" else "bilinear"  # "bilinear" on 5D is trilinear
    out = F.grid_sample(data[None], grid, mode=mode, padding_mode="border", align_corners=True)
    index_to_old = np.diag(np.append(ratio, 1.0))
    index_to_old[:3, 3] = offsets
    out = out[0].numpy()
    return (out[0] if volume.ndim == 3 else out), affine @ index_to_old


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """``mask`` (X, Y, Z) with every background region of an axial slice that does not
    touch the slice border set to True (flood fill from the border, 4-connected)."""
    inside = np.pad(mask, ((1, 1), (1, 1), (0, 0)), constant_values=False)
    outside = np.zeros_like(inside)
    outside[[0, -1], :], outside[:, [0, -1]] = True, True
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~inside
        if np.array_equal(grown, outside):
            return ~outside[1:-1, 1:-1]
        outside = grown


def body_mask(ct_hu: np.ndarray, structures: dict[str, np.ndarray]) -> np.ndarray:
    """The body: a structure named body/external/skin if any, else HU > -500 united with
    every structure, axial holes filled (see the module docstring)."""
    for name, mask in structures.items():
        if name.lower() in BODY_NAMES:
            return mask.copy()
    body = ct_hu > BODY_THRESHOLD_HU
    for mask in structures.values():
        body |= mask
    return fill_holes_axial(body)


def prepare_patient(patient: DosePatient, spacing_mm=None) -> PreparedPatient:
    """Load, validate and resample one patient (``spacing_mm`` None keeps its own spacing).

    Raises ``SubjectRejected`` with a message naming the column and file at fault.
    """
    ct, affine, notes = _load(patient.ct, "ct")
    reference = (ct, affine, patient.ct)
    dose, _, more = _load(patient.dose, "dose", reference)
    notes += more
    if dose.min() < -NEGATIVE_DOSE_TOLERANCE_GY:
        raise SubjectRejected(f"column 'dose': {patient.dose} has negative doses (min "
                              f"{dose.min():.4g} Gy); expected a dose in Gy >= 0")
    masks, shape = {}, ct.shape
    for name, path in patient.structures.items():
        if path is None:
            notes.append(f"structure {name!r} is not contoured (blank cell): empty mask")
            masks[name] = np.zeros(shape, dtype=np.float32)
            continue
        mask, _, more = _load(path, name, reference)
        notes += more
        if mask.min() < 0:
            raise SubjectRejected(f"column {name!r}: {path} has negative labels "
                                  f"(min {mask.min():g}); expected a 0/1 mask")
        if not np.isin(mask, (0, 1)).all():
            notes.append(f"column {name!r}: {path} is not a 0/1 mask: inside = value > 0.5")
        if not (mask > 0.5).any():
            notes.append(f"column {name!r}: {path} is empty")
        masks[name] = (mask > 0.5).astype(np.float32)
    spacing = nib.affines.voxel_sizes(affine) if spacing_mm is None else spacing_mm
    images, new_affine = resample_to_spacing(np.stack([ct, np.clip(dose, 0, None)]), affine,
                                             spacing, "linear")
    structures = {}
    if masks:
        stacked, _ = resample_to_spacing(np.stack(list(masks.values())), affine, spacing,
                                         "nearest")
        structures = {name: stacked[k] > 0.5 for k, name in enumerate(masks)}
    body = body_mask(images[0], structures)
    return PreparedPatient(images[0], images[1], structures, body, new_affine, notes)


# ----------------------------------------------------------------------------- settings / meta


def dose_cache_settings(cfg) -> dict:
    """The settings that determine a dose cache's contents (what verification compares)."""
    s = {
        "source": str(cfg.source),
        "spacing_mm": None if cfg.spacing_mm is None else [float(v) for v in cfg.spacing_mm],
        "ct_window": [float(v) for v in cfg.ct_window],
        "dose_scale_gy": float(cfg.dose_scale_gy),
        "split_fractions": [float(v) for v in cfg.split_fractions],
        "split_seed": int(cfg.split_seed),
    }
    if s["source"] == "phantom":
        s.update(root=str(Path(cfg.root)), n_patients=int(cfg.n_patients),
                 phantom_size=int(cfg.phantom_size), phantom_seed=int(cfg.phantom_seed))
    else:
        s["manifest"] = str(Path(cfg.manifest)) if cfg.manifest else None
    return settings_value(s)


def _check_settings(cfg) -> None:
    if cfg.source not in ("phantom", "manifest"):
        raise CacheError(f"data.source={cfg.source!r}: expected 'phantom' or 'manifest'")
    if cfg.source == "manifest" and not cfg.manifest:
        raise CacheError("data.source is 'manifest' but data.manifest is not set")
    lo, hi = (float(v) for v in cfg.ct_window)
    if not lo < hi:
        raise CacheError(f"data.ct_window=[{lo:g}, {hi:g}]: expected [low, high] HU, low < high")
    if not float(cfg.dose_scale_gy) > 0:
        raise CacheError(f"data.dose_scale_gy={cfg.dose_scale_gy}: expected a dose > 0 Gy")
    if cfg.spacing_mm is not None and (len(cfg.spacing_mm) != 3
                                       or not all(float(v) > 0 for v in cfg.spacing_mm)):
        raise CacheError(f"data.spacing_mm={cfg.spacing_mm}: expected three sizes > 0 mm or null")
    split_subjects(["a", "b", "c"], cfg.split_fractions, 0)  # validates the fractions


def load_dose_meta(cache_dir: str | Path) -> dict:
    """Read and sanity-check a dose cache's ``meta.yaml``."""
    path = Path(cache_dir) / "meta.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no dose cache at {cache_dir} ({path.name} missing): build it "
                                "with ddpm.dose_cache.ensure_dose_cache(config.dose)")
    meta = yaml.safe_load(path.read_text())
    missing = [k for k in _META_REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format_version") != DOSE_CACHE_FORMAT_VERSION:
        raise StaleCacheError(f"{path} is not a dose cache of format {DOSE_CACHE_FORMAT_VERSION} "
                              f"(missing {missing}, format {(meta or {}).get('format_version')})"
                              f": delete {cache_dir} and build it again")
    return meta


def verify_dose_cache(cache_dir: str | Path, cfg, config_path=None) -> dict:
    """The cache's meta if it matches ``cfg``; else ``StaleCacheError`` naming every differing
    field (config value vs cache value) and how to rebuild."""
    meta = load_dose_meta(cache_dir)
    want, have = dose_cache_settings(cfg), settings_value(meta["settings"])
    rebuild = (f"delete {cache_dir} and run again (it is rebuilt from "
               f"{config_path or 'the config'}), or set data.cache_dir elsewhere")
    diffs = [f"  data.{k}: config {want.get(k, '(absent)')!r} vs cache {have.get(k, '(absent)')!r}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        raise StaleCacheError(f"dose cache {cache_dir} is stale: it was built with other data "
                              "settings:\n" + "\n".join(diffs) + f"\nTo rebuild it, {rebuild}")
    absent = [f for p in meta["patients"].values() for f in p["files"].values()
              if not (Path(cache_dir) / f).is_file()]
    if absent:
        raise StaleCacheError(f"dose cache {cache_dir} lacks {absent[:3]}...; to rebuild it, "
                              f"{rebuild}")
    return meta


# ----------------------------------------------------------------------------- build


def _phantom_manifest(cfg, progress: bool) -> Path:
    """The phantom set's manifest, generated into ``cfg.root`` unless already there."""
    from ddpm.dose_phantoms import generate_dose_phantoms

    try:  # returns an existing set made with the same settings; refuses any other content
        return Path(generate_dose_phantoms(cfg.root, n_patients=int(cfg.n_patients),
                                           size=int(cfg.phantom_size),
                                           seed=int(cfg.phantom_seed), progress=progress))
    except FileExistsError as exc:
        raise CacheError(f"data.root: {exc}") from None


def _file_stem(index: int, name: str) -> str:
    return f"{index:04d}_" + re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _write_patient(folder: Path, stem: str, prep: PreparedPatient, cfg) -> dict:
    """Save the three arrays of one patient; returns their file names (relative to the cache)."""
    ct = ct_to_model(prep.ct_hu, cfg.ct_window)
    channels = [ct] + [np.where(m, 1.0, -1.0) for m in prep.structures.values()]
    arrays = {"anatomy": np.stack(channels).astype(np.float32),
              "dose": gy_to_dose(prep.dose_gy, cfg.dose_scale_gy)[None].astype(np.float32),
              "masks": np.stack([prep.body, *prep.structures.values()])}
    files = {}
    for kind, array in arrays.items():
        files[kind] = f"patients/{stem}_{kind}.npy"
        np.save(folder / files[kind], array)
    return files


def build_dose_cache(cfg, *, progress: bool = True) -> Path:
    """Validate and convert every patient, then write the dose cache to ``cfg.cache_dir``.

    Any rejected patient stops the build with one ``CacheError`` listing them all; nothing is
    written (the cache is built in a temporary sibling folder and renamed into place, and an
    older cache is replaced only once the new one is complete). Returns the cache folder.
    """
    _check_settings(cfg)
    target = Path(cfg.cache_dir)
    if target.is_file() or (target.is_dir() and any(target.iterdir())
                            and not (target / "meta.yaml").is_file()):
        raise CacheError(f"data.cache_dir {target} exists and is not a dose cache (no meta.yaml):"
                         " refusing to replace it; choose another data.cache_dir")
    manifest = _phantom_manifest(cfg, progress) if cfg.source == "phantom" else cfg.manifest
    patients, structures = read_dose_manifest(manifest)
    splits = split_subjects([p.name for p in patients], cfg.split_fractions, cfg.split_seed)
    split_of = {name: s for s, names in splits.items() for name in names}
    spacing = None if cfg.spacing_mm is None else [float(v) for v in cfg.spacing_mm]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        (tmp / "patients").mkdir()
        patient_meta, rejected, notes = {}, [], []
        for k, patient in enumerate(tqdm(patients, desc="caching patients", unit="patient",
                                         disable=not progress)):
            try:
                prep = prepare_patient(patient, spacing)
            except SubjectRejected as exc:
                rejected.append(f"  {patient.name}: {exc}")
                continue
            if spacing is None:  # the first patient's spacing becomes the common one
                spacing = rounded_floats(nib.affines.voxel_sizes(prep.affine))
            max_gy = float(prep.dose_gy.max())
            if max_gy > float(cfg.dose_scale_gy):
                prep.warnings.append(f"max dose {max_gy:.4g} Gy exceeds data.dose_scale_gy="
                                     f"{cfg.dose_scale_gy:g}: it maps above +1")
            notes += [f"{patient.name}: {n}" for n in prep.warnings]
            patient_meta[patient.name] = {
                "split": split_of[patient.name],
                "files": _write_patient(tmp, _file_stem(k, patient.name), prep, cfg),
                "shape": list(prep.ct_hu.shape), "affine": rounded_floats(prep.affine),
                "source": {"ct": str(patient.ct), "dose": str(patient.dose)},
                "max_dose_gy": round(max_gy, 6),
                "ptv_voxels": int(sum(prep.structures[s].sum() for s in ptv_names(structures))),
            }
        if rejected:
            raise CacheError(f"{len(rejected)} of {len(patients)} patients rejected (manifest "
                             f"{manifest}); nothing was written:\n" + "\n".join(rejected))
        for note in notes:
            warnings.warn(note, DataWarning, stacklevel=2)
        settings = dose_cache_settings(cfg)
        lo, hi = settings["ct_window"]
        meta = {
            "format_version": DOSE_CACHE_FORMAT_VERSION,
            "ddpm_version": ddpm.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings_hash": settings_hash(settings),
            "settings": settings,
            "manifest": str(manifest),
            "spacing_mm": rounded_floats(spacing),
            "orientation": "RAS (nibabel.as_closest_canonical), arrays (C, X, Y, Z)",
            "normalisation": {
                "ct_window": [lo, hi],
                "ct_rule": f"clip HU to [{lo:g}, {hi:g}], map linearly to [-1, 1]",
                "dose_scale_gy": settings["dose_scale_gy"],
                "dose_rule": "dose = 2 Gy / dose_scale_gy - 1 (not clipped); "
                             "Gy = (dose + 1) dose_scale_gy / 2",
                "masks": "-1 outside, +1 inside",
            },
            "structures": structures,
            "ptvs": ptv_names(structures),
            "channels": {"anatomy": ["ct", *structures], "dose": ["dose"],
                         "masks": ["body", *structures]},
            "body_rule": f"structure named one of {list(BODY_NAMES)}, else HU > "
                         f"{BODY_THRESHOLD_HU:g} united with all structures, axial holes filled",
            "splits": {s: {"patients": splits[s]} for s in SPLITS},
            "warnings": notes,
            "patients": patient_meta,
        }
        (tmp / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        tmp.chmod(0o755)  # mkdtemp makes it private
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_dose_cache(cfg, config_path=None, progress: bool = True) -> Path:
    """The dose cache for ``cfg``: verified when present, built when absent (generating the
    phantoms first when ``source`` is "phantom")."""
    target = Path(cfg.cache_dir)
    if (target / "meta.yaml").is_file():
        verify_dose_cache(target, cfg, config_path)
        return target
    return build_dose_cache(cfg, progress=progress)
