"""Synthetic subjects written as NIfTI: the embedded default data, so nothing needs a download.

Anatomy is drawn from analytic shapes evaluated on smoothly deformed millimetre coordinates, so
edges stay sharp (with one voxel of partial volume) at any grid size. Deterministic for a seed.

* `brain_phantom` / `generate_brain_phantoms`: FLAIR-like head MRI (dark CSF, grey matter brighter
  than white matter, a bright skull ring) with 1-4 hyperintense focal lesions and their exact mask.
* The shared building blocks (random fields, deformed coordinates, ellipsoids, blobs, writing a
  set atomically), also used by the thorax dose phantoms of `ddpm.dose_phantoms`.

Conventions: arrays are (X, Y, Z) in RAS (x: left -> right, y: posterior -> anterior,
z: inferior -> superior); the affine maps voxel indices to millimetres, isotropic spacing, world
origin at the volume centre. Images (MRI, CT in HU, dose in Gy) are saved as float32 without
scaling, masks as uint8.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import reduce
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

PHANTOM_FORMAT_VERSION = 1
_BRAIN_FOV_MM = 200.0  # 3.125 mm voxels at 64^3: an adult head fills about 3/4 of the field

# FLAIR-like mean intensities (arbitrary units); each subject jitters them by a few percent.
_BRAIN_INTENSITY = {
    "scalp": 0.50, "skull": 0.85, "csf": 0.06, "gm": 0.60, "wm": 0.42, "deep_gm": 0.52,
    "orbit_fat": 0.75, "eye": 0.10, "soft": 0.36,
}


# ---------------------------------------------------------------------------------------------
# Shared geometry helpers
# ---------------------------------------------------------------------------------------------

def check_int(name: str, value, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def spawn_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """Independent generators for one subject, so that e.g. lesions do not shift the noise."""
    check_int("seed", seed, 0)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def member_seed(seed: int, index: int) -> int:
    """Seed of member `index` of a generated set; sets made with different seeds do not overlap."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def centred_affine(size: int, spacing: float) -> np.ndarray:
    """RAS voxel -> mm affine with isotropic spacing and the world origin at the volume centre."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    return affine


def gaussian_filter(vol: np.ndarray, sigma_mm: float, spacing: float, pad: int = 0,
                    ndim: int = 3, halo: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Gaussian blur over the last `ndim` axes via FFT; `pad` voxels of zeros avoid wrap-around.
    `halo` = (sigma_mm, weight) adds a second, broader Gaussian with that weight."""
    axes = tuple(range(-ndim, 0))
    shape = tuple(n + 2 * pad for n in vol.shape[-ndim:])
    freqs = [np.fft.fftfreq(n, d=spacing) for n in shape[:-1]] + [
        np.fft.rfftfreq(shape[-1], d=spacing)]
    f2 = sum(np.reshape(f.astype(np.float32) ** 2, [-1 if k == i else 1 for k in range(ndim)])
             for i, f in enumerate(freqs))
    # The Fourier transform of a Gaussian of std sigma is exp(-2 pi^2 sigma^2 f^2).
    transfer = np.exp(-2 * math.pi**2 * sigma_mm**2 * f2)
    if halo[1]:
        transfer += halo[1] * np.exp(-2 * math.pi**2 * halo[0] ** 2 * f2)
    spec = np.fft.rfftn(vol, s=shape, axes=axes) * transfer
    out = np.fft.irfftn(spec, s=shape, axes=axes)
    return out[(..., *[slice(0, n) for n in vol.shape[-ndim:]])].astype(np.float32)


def _linear_upsample_matrix(n_fine: int, factor: int, n_coarse: int) -> np.ndarray:
    """(n_fine, n_coarse) weights that linearly interpolate a coarse axis onto a fine one."""
    pos = np.arange(n_fine) / factor
    lo = np.floor(pos).astype(int)
    weights = np.zeros((n_fine, n_coarse), np.float32)
    weights[np.arange(n_fine), lo] = 1 - (pos - lo)
    weights[np.arange(n_fine), lo + 1] = pos - lo
    return weights


def smooth_fields(rng, n: int, size: int, spacing: float, sigma_mm: float) -> np.ndarray:
    """n random fields (n, X, Y, Z), zero mean and unit std, with features of about sigma_mm.

    White noise is low-passed by a Gaussian; broad fields are made on a coarser grid (still
    >= 2 coarse voxels per sigma) and linearly interpolated, which is much cheaper.
    """
    factor = max(1, int(sigma_mm / (2 * spacing)))
    n_coarse = size if factor == 1 else (size - 1) // factor + 2
    fields = gaussian_filter(
        rng.standard_normal((n, n_coarse, n_coarse, n_coarse), dtype=np.float32),
        sigma_mm, spacing * factor,
    )
    if factor > 1:
        up = _linear_upsample_matrix(size, factor, n_coarse)
        for axis in (1, 2, 3):
            fields = np.moveaxis(np.moveaxis(fields, axis, -1) @ up.T, -1, axis)
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation from angles (rad) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_coords(rng, size, spacing, scale, rot_deg, disp_mm, disp_sigma_mm) -> np.ndarray:
    """Millimetre coordinates (3, X, Y, Z) of each voxel in one subject's own anatomy frame:
    world coordinates under a random per-axis scale, small rotation and a smooth displacement."""
    c = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
    world = np.stack(np.meshgrid(c, c, c, indexing="ij"))  # (3, X, Y, Z)
    rot = _rotation(np.deg2rad(rng.uniform(-1, 1, 3) * np.asarray(rot_deg))).astype(np.float32)
    axis_scale = rng.uniform(scale[0], scale[1], 3).astype(np.float32)
    coords = np.einsum("ij,jxyz->ixyz", rot, world) / axis_scale[:, None, None, None]
    return coords + disp_mm * smooth_fields(rng, 3, size, spacing, disp_sigma_mm)


def ellipsoid_depth(coords, centre, semi) -> np.ndarray:
    """Approximate depth in mm below the surface of an axis-aligned ellipsoid (or ellipse when
    given two coordinates): positive inside, exact for spheres, measured along the ray from the
    centre."""
    rel = [c - m for c, m in zip(coords, centre)]
    r = np.sqrt(sum((d / s) ** 2 for d, s in zip(rel, semi)))
    dist = np.sqrt(sum(d**2 for d in rel))
    radius_along_ray = np.where(r > 1e-6, dist / np.maximum(r, 1e-6), reduce(np.minimum, semi))
    return (1 - r) * radius_along_ray


def inside_fraction(depth, width) -> np.ndarray:
    """Partial-volume fraction inside a surface from a signed depth (mm): one-voxel linear ramp."""
    return np.clip(0.5 + depth / width, 0.0, 1.0).astype(np.float32)


def paint(img, fraction, value) -> None:
    """Draw a tissue over what is already there, in proportion to its voxel fraction."""
    img += fraction * (value - img)


def random_blob(axes, rng, centre, n_parts, semi_range, spread_mm) -> np.ndarray:
    """Random blob on the grid with 1-D millimetre `axes`: a union of rotated ellipsoids near
    `centre`, the first one centred on it (so the voxel at `centre` is always inside)."""
    inside = np.zeros([len(a) for a in axes], dtype=bool)
    reach = semi_range[1] + 3 * spread_mm
    box = tuple(slice(np.searchsorted(a, c - reach), np.searchsorted(a, c + reach, "right"))
                for a, c in zip(axes, centre))
    grid = np.meshgrid(*[a[b] for a, b in zip(axes, box)], indexing="ij", sparse=True)
    for k in range(n_parts):
        offset = np.zeros(3) if k == 0 else np.clip(rng.normal(0, spread_mm, 3), -2 * spread_mm,
                                                     2 * spread_mm)
        rot = _rotation(rng.uniform(-math.pi, math.pi, 3))
        semi = rng.uniform(semi_range[0], semi_range[1], 3)
        rel = [g - (c + o) for g, c, o in zip(grid, centre, offset)]
        local = [sum(rot[j, i] * rel[j] for j in range(3)) for i in range(3)]
        inside[box] |= sum((l / s) ** 2 for l, s in zip(local, semi)) <= 1.0
    return inside


# ---------------------------------------------------------------------------------------------
# Brain MRI with focal lesions
# ---------------------------------------------------------------------------------------------

def brain_phantom(size: int = 64, seed: int = 0, lesion: bool = True):
    """One synthetic FLAIR-like head: (image float32 (X, Y, Z), lesion mask uint8, affine 4x4).

    The same seed with `lesion=False` gives the same subject without lesions: the two images are
    identical outside the lesion mask.
    """
    check_int("size", size, 16)
    rng_anat, rng_lesion, rng_noise = spawn_rngs(seed, 3)
    spacing = _BRAIN_FOV_MM / size
    w = spacing  # partial-volume ramp width
    q = subject_coords(rng_anat, size, spacing, (0.92, 1.05), (6, 4, 8), 2.5, 30.0)
    x, y, z = q[0], q[1] + 4.0, q[2] + 4.0  # head-centred subject coordinates (mm)
    fold = smooth_fields(rng_anat, 1, size, spacing, 5.0)[0]
    val = {k: v * (1 + 0.06 * rng_anat.standard_normal()) for k, v in _BRAIN_INTENSITY.items()}

    # Head: an ellipsoid with scalp and a skull shell; a neck below, orbits in front.
    head = ellipsoid_depth((x, y, z), (0, 0, 0), (74, 92, 86))
    neck = np.minimum(ellipsoid_depth((x, y), (0, -14), (50, 56)), -40 - z)
    orbit = [ellipsoid_depth((x, y, z), (s * 31, 70, -36), (17, 17, 14)) for s in (-1, 1)]
    img = np.zeros(x.shape, np.float32)
    paint(img, inside_fraction(np.maximum.reduce([head, neck, *orbit]), w), val["soft"])
    paint(img, inside_fraction(head, w), val["scalp"])
    paint(img, inside_fraction(head - 5, w), val["skull"])
    # Skull base: the floor of the cranial cavity, deeper at the back (posterior fossa); below
    # it lie the soft tissues of the face and neck.
    base = -50 - 16 * np.clip(-y / 50, 0, 1)
    paint(img, inside_fraction(np.minimum(head - 11, base - 3 - z), w), val["soft"])
    intracranial = np.minimum(head - 11, z - base)
    paint(img, inside_fraction(intracranial, w), val["csf"])

    # Brain: the cerebrum fills the cavity down to its floor, which rises at the back to the
    # tentorium above the cerebellum; the brainstem sits on the midline in front of it.
    floor = base + 2 + (-30 - base - 2) * np.clip((-y - 5) / 25, 0, 1)
    cerebrum = np.minimum(intracranial - 2.5, z - floor)
    cerebellum = np.minimum(ellipsoid_depth((x, y, z), (0, -44, -48), (58, 34, 24)),
                            intracranial - 2)
    brainstem = np.minimum(ellipsoid_depth((x, y), (0, -16), (13, 12)),
                           np.minimum(-10 - z, z - base))
    parenchyma = np.maximum.reduce([cerebrum, cerebellum, brainstem])
    paint(img, inside_fraction(parenchyma, w), val["gm"])
    # Gyri: white matter comes within ~2.5 mm of the surface at gyral crowns but stays deep
    # beneath sulci (the zero crossings of `fold`), where grey matter lines a CSF cleft.
    sulcus = np.exp(-((fold / 0.5) ** 2))
    wm_depth = np.maximum.reduce([cerebrum - 2.5 - 9 * sulcus, cerebellum - 7, brainstem - 2])
    paint(img, inside_fraction(wm_depth, w), val["wm"])
    cleft = np.where(cerebrum > -w, np.minimum((0.2 - np.abs(fold)) * 6, 10 - cerebrum), -w)
    fissure = np.minimum(2.0 - np.abs(x), np.maximum(z - 16, np.abs(y + 4) - 40))
    paint(img, inside_fraction(np.minimum(np.maximum(cleft, fissure), intracranial), w), val["csf"])

    # Deep grey nuclei and the ventricles: a butterfly of lateral ventricles whose horns diverge
    # and dip towards the back, and a thin midline third ventricle below them.
    deep = np.maximum(*[ellipsoid_depth((x, y, z), (s * 17, -4, 2), (9, 16, 10)) for s in (-1, 1)])
    paint(img, inside_fraction(deep, w), val["deep_gm"])
    vs = rng_anat.uniform(0.8, 1.6)  # ventricle size: young to atrophic
    back, front = np.clip(-(y + 6), 0, None), np.clip(y + 6, 0, None)
    lateral = []
    for s in (-1, 1):
        centre_x = s * (4 + 0.012 * back**2 + 0.002 * front**2)
        centre_z = 14 - 0.008 * back**2
        r = np.sqrt(((x - centre_x) / (4.5 * vs)) ** 2 + ((y + 6) / 34) ** 2
                    + ((z - centre_z) / (8 * vs)) ** 2)
        lateral.append((1 - r) * 4.5 * vs)
    third = np.minimum.reduce([1.5 * vs - np.abs(x), 10 - np.abs(y + 4), 9 - np.abs(z + 4)])
    ventricle = np.maximum.reduce([*lateral, third])
    paint(img, inside_fraction(ventricle, w), val["csf"])
    for o, s in zip(orbit, (-1, 1)):
        paint(img, inside_fraction(o, w), val["orbit_fat"])
        eye = ellipsoid_depth((x, y, z), (s * 31, 72, -36), (11, 11, 11))
        paint(img, inside_fraction(eye, w), val["eye"])

    # Lesions: 1-4 blobs centred in deep or juxtacortical white matter of the cerebrum.
    mask = np.zeros(x.shape, dtype=bool)
    if lesion:
        wm = (wm_depth > w) & (cerebrum > 0) & (z > -12) & (z < 55) & (ventricle < -w)
        candidates = np.flatnonzero(wm) if wm.any() else [np.argmax(wm_depth)]  # tiny grids
        axes = [np.arange(size) * spacing] * 3
        allowed = (parenchyma > 0) & (ventricle < 0)
        for _ in range(rng_lesion.integers(1, 5)):
            centre = np.array(np.unravel_index(rng_lesion.choice(candidates), x.shape)) * spacing
            blob = random_blob(axes, rng_lesion, centre, rng_lesion.integers(1, 4), (3.0, 9.0), 3.0)
            contrast = rng_lesion.uniform(1.6, 2.4)
            new = blob & allowed & ~mask
            img[new] = val["wm"] * contrast * (1 + 0.05 * rng_lesion.standard_normal(new.sum()))
            mask |= new

    # Scanner effects: a smooth multiplicative bias field, then Rician noise.
    img *= np.exp(0.12 * smooth_fields(rng_noise, 1, size, spacing, 45.0)[0])
    sigma = rng_noise.uniform(0.015, 0.03)
    n1, n2 = rng_noise.standard_normal((2, *img.shape), dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)
    return img, mask.astype(np.uint8), centred_affine(size, spacing)


def generate_brain_phantoms(out_dir, n_subjects: int = 24, size: int = 64, seed: int = 0,
                            lesion_fraction: float = 0.75, progress: bool = True) -> Path:
    """Write a set of brain phantoms and return the path of its manifest.csv.

    Files: sub-000_image.nii.gz (float32), sub-000_mask.nii.gz (uint8), ... and manifest.csv with
    columns subject,image,mask,pathology (paths relative to the manifest; pathology 1 when the
    subject has lesions). round(lesion_fraction * n_subjects) subjects, picked from the seed,
    have lesions. Subject i is `brain_phantom(size, seed=s_i, lesion=...)` with s_i derived
    from (seed, i) and recorded in phantoms.json.

    The set is written to a temporary folder beside out_dir and renamed into place. Calling again
    with the same arguments returns the existing manifest; a non-empty out_dir holding anything
    else raises FileExistsError.
    """
    check_int("size", size, 16)
    check_int("n_subjects", n_subjects, 1)
    check_int("seed", seed, 0)
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction!r}")
    rng = spawn_rngs(seed, 1)[0]
    with_lesion = np.zeros(n_subjects, dtype=bool)
    with_lesion[rng.permutation(n_subjects)[: round(lesion_fraction * n_subjects)]] = True
    seeds = [member_seed(seed, i) for i in range(n_subjects)]
    params = {"kind": "brain", "format_version": PHANTOM_FORMAT_VERSION,
              "n_subjects": int(n_subjects), "size": int(size), "seed": int(seed),
              "lesion_fraction": float(lesion_fraction), "subject_seeds": seeds}

    def write_subject(folder: Path, i: int) -> list:
        image, mask, affine = brain_phantom(size, seeds[i], bool(with_lesion[i]))
        name = f"sub-{i:03d}"
        save_nifti(folder / f"{name}_image.nii.gz", image, affine)
        save_nifti(folder / f"{name}_mask.nii.gz", mask, affine)
        return [name, f"{name}_image.nii.gz", f"{name}_mask.nii.gz", int(with_lesion[i])]

    header = ["subject", "image", "mask", "pathology"]
    return write_phantom_set(out_dir, params, header, n_subjects, write_subject,
                             "brain phantoms", progress)


# ---------------------------------------------------------------------------------------------
# Writing a set: temporary folder, then rename
# ---------------------------------------------------------------------------------------------

def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Save ``array`` as NIfTI with ``affine`` as both qform and sform (RAS, millimetres)."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner-anatomical (RAS) space
    image.set_sform(affine, code=1)
    nib.save(image, path)


def write_phantom_set(out_dir, params: dict, header: list[str], n: int,
                      write_member: Callable[[Path, int], list], desc: str, progress: bool) -> Path:
    """Write members 0..n-1 and manifest.csv into a temporary folder beside out_dir, then rename
    it to out_dir; an existing set made with the same params is returned as is."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    params = json.loads(json.dumps(params))  # the form it takes once read back
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            existing = json.loads((out_dir / "phantoms.json").read_text())
        except (OSError, ValueError):
            existing = None
        if existing == params and manifest.is_file():
            return manifest
        if not isinstance(existing, dict) or existing == params:
            raise FileExistsError(f"{out_dir} exists and is not empty; phantoms are written only "
                                  "into a new or empty folder")
        differ = sorted(k for k in params.keys() | existing.keys()
                        if not k.endswith("_seeds") and params.get(k) != existing.get(k))
        what = ", ".join(f"{k}={existing.get(k)!r} (asked {params.get(k)!r})" for k in differ)
        raise FileExistsError(f"{out_dir} holds phantoms made with other settings: {what}; "
                              "remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        rows = [write_member(tmp, i) for i in tqdm(range(n), desc=desc, disable=not progress)]
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        (tmp / "phantoms.json").write_text(json.dumps(params, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
