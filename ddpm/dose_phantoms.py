"""Synthetic thorax patients for dose prediction, written as NIfTI (the default dose data).

* `dose_phantom` / `generate_dose_phantoms`: thorax CT in HU, target and organ-at-risk masks, and
  a dose in Gy summed from coplanar beams shaped to the targets. Deterministic for a seed.

Built from the shapes and conventions of `ddpm.phantoms` (arrays (X, Y, Z) in RAS, millimetre
affine with the world origin at the volume centre; CT and dose saved as float32, masks as uint8).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddpm.phantoms import (
    PHANTOM_FORMAT_VERSION,
    centred_affine,
    check_int,
    ellipsoid_depth,
    gaussian_filter,
    inside_fraction,
    member_seed,
    paint,
    random_blob,
    save_nifti,
    smooth_fields,
    spawn_rngs,
    subject_coords,
    write_phantom_set,
)

_DOSE_FOV_MM = 336.0  # 7 mm voxels at 48^3: lower neck to upper abdomen

DOSE_STRUCTURES = (
    "PTV_high", "PTV_low", "SpinalCord", "Esophagus", "Heart", "Lung_L", "Lung_R", "Body",
)


# ---------------------------------------------------------------------------------------------
# Thorax CT, structures and dose
# ---------------------------------------------------------------------------------------------

def _rotate_xy(vol: np.ndarray, angle: float, nearest: bool = False) -> np.ndarray:
    """Resample vol (X, Y, Z) so that out(p) = vol(R(angle) p), R rotating the x-y plane about
    the grid centre; bilinear (or nearest-neighbour), zero outside. Angle -angle undoes it."""
    nx, ny, nz = vol.shape
    i, j = np.meshgrid(np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    src_i, src_j = c * i - s * j + (nx - 1) / 2, s * i + c * j + (ny - 1) / 2
    if nearest:
        corners = [(np.rint(src_i).astype(int), np.rint(src_j).astype(int), 1.0)]
    else:
        i0, j0 = np.floor(src_i).astype(int), np.floor(src_j).astype(int)
        fi, fj = src_i - i0, src_j - j0
        corners = [(i0, j0, (1 - fi) * (1 - fj)), (i0 + 1, j0, fi * (1 - fj)),
                   (i0, j0 + 1, (1 - fi) * fj), (i0 + 1, j0 + 1, fi * fj)]
    flat = vol.reshape(nx * ny, nz)
    out = np.zeros(flat.shape, vol.dtype)
    for ii, jj, weight in corners:
        weight = np.where((ii >= 0) & (ii < nx) & (jj >= 0) & (jj < ny), weight, 0).ravel()
        used = np.flatnonzero(weight)
        index = np.clip(ii, 0, nx - 1) * ny + np.clip(jj, 0, ny - 1)
        taken = flat[index.ravel()[used]]
        out[used] += taken if nearest else weight[used, None].astype(vol.dtype) * taken
    return out.reshape(vol.shape)


def _dilate_2d(image: np.ndarray, radius: int) -> np.ndarray:
    """Grey-level dilation of a 2-D image by a disk of `radius` voxels (max over the disk)."""
    padded = np.pad(image, radius)
    out = image.copy()
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            if di * di + dj * dj <= radius * radius:
                window = padded[radius + di: radius + di + image.shape[0],
                                radius + dj: radius + dj + image.shape[1]]
                np.maximum(out, window, out=out)
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by one voxel (6-neighbourhood); voxels on the border are removed."""
    out = mask.copy()
    out[[0, -1]] = out[:, [0, -1]] = out[:, :, [0, -1]] = False
    for axis in range(3):
        out &= np.roll(mask, 1, axis) & np.roll(mask, -1, axis)
    return out


def _thorax(rng, size: int, spacing: float):
    """Noise-free thorax CT (HU) and structure masks of one patient."""
    w = spacing
    x, y, z = subject_coords(rng, size, spacing, (0.93, 1.06), (3, 3, 4), 4.0, 40.0)
    a, b = rng.uniform(125, 150), rng.uniform(88, 108)  # body half-width and half-depth (mm)
    fat = rng.uniform(8, 20)  # subcutaneous fat thickness (mm)
    taper = 1 - 0.3 * np.clip((z - 110) / 60, 0, 1)  # narrower towards the neck
    body = ellipsoid_depth((x, y), (0, 0), (a * taper, np.where(y < 0, 0.9 * b, b) * taper))
    wall = body - fat  # depth below the fat layer
    ct = np.full(x.shape, -1000.0, np.float32)
    paint(ct, inside_fraction(body, w), -90.0)
    paint(ct, inside_fraction(wall, w), 40.0)

    # Bones: ribs as bands in the chest wall (open at the front), sternum, vertebrae with discs.
    band = (np.cos(2 * math.pi * z / 28 + rng.uniform(0, 2 * math.pi)) - 0.3) * 12
    ribs = np.minimum.reduce([wall - 4, 14 - wall, band, np.maximum(np.abs(x) - 30, -y)])
    paint(ct, inside_fraction(ribs, w), 500.0)
    sternum = np.minimum.reduce([wall - 2, 14 - wall, 15 - np.abs(x), y])
    paint(ct, inside_fraction(sternum, w), 350.0)
    yv = -0.9 * b + 62 + rng.normal(0, 3)  # vertebral body centre
    disc = np.cos(2 * math.pi * z / 30 + rng.uniform(0, 2 * math.pi)) < -0.6
    paint(ct, inside_fraction(ellipsoid_depth((x, y), (0, yv), (18, 16)), w),
          np.where(disc, 80.0, 450.0))
    canal = yv - 30
    arch = np.maximum(ellipsoid_depth((x, y), (0, canal), (15, 14)),
                      np.minimum.reduce([5 - np.abs(x), canal - 8 - y, y - canal + 26]))
    paint(ct, inside_fraction(arch, w), 500.0)
    cord = ellipsoid_depth((x, y), (0, canal), (7.5, 7.5))
    paint(ct, inside_fraction(cord, w), 30.0)

    # Airway and oesophagus in front of the spine; the trachea splits at the carina.
    z_carina = rng.uniform(20, 50)
    esophagus = ellipsoid_depth((x, y), (-8, yv + 30), (8, 7))
    paint(ct, inside_fraction(esophagus, w), 35.0)
    airway = np.minimum(ellipsoid_depth((x, y), (0, yv + 50), (9, 8)), z - z_carina)
    paint(ct, inside_fraction(airway, w), -1000.0)

    # Heart on the diaphragm, left of the midline; lungs around it, above the diaphragm domes.
    hc = (rng.uniform(-30, -12), yv + 28 + 0.4 * b, z_carina - 65 + rng.normal(0, 8))
    heart = np.minimum(ellipsoid_depth((x, y, z), hc, (0.36 * a, 0.4 * b, 50)), -esophagus - 4)
    paint(ct, inside_fraction(heart, w), 40.0)
    texture = smooth_fields(rng, 1, size, spacing, 5.0)[0]
    lungs = {}
    for name, side in (("Lung_L", -1), ("Lung_R", 1)):
        cx = side * a * 0.45
        dome = hc[2] - 30 + 12 * (side > 0) - 0.004 * ((x - cx) ** 2 + (y + 0.1 * b) ** 2)
        lungs[name] = np.minimum.reduce([
            ellipsoid_depth((x, y, z), (cx, -0.05 * b, 0), (a * 0.42, b * 0.78, 145)), wall - 12,
            z - dome, side * x - 22, -heart - 3, -ellipsoid_depth((x, y), (0, yv), (22, 20))])
        paint(ct, inside_fraction(lungs[name], w), -840.0 + 40 * texture)
        if side > 0:  # liver under the right dome
            liver = np.minimum.reduce([wall - 10, dome - 8 - z, x + 40])
            paint(ct, inside_fraction(liver, w), 60.0)

    # Targets: a tumour (in a lung 70% of the time, else hilar) with its PTV, and a lower-dose
    # nodal PTV in the mediastinum that excludes the high-dose one.
    axes = [(np.arange(size) - (size - 1) / 2) * spacing] * 3
    inside = body > 0
    if rng.random() < 0.7:
        lung = lungs["Lung_L" if rng.random() < 0.5 else "Lung_R"]
        candidates = np.flatnonzero(lung > min(15.0, lung.max() / 2))
        centre = [ax[i] for ax, i in zip(axes, np.unravel_index(rng.choice(candidates),
                                                                  x.shape))]
    else:
        centre = [rng.choice([-1, 1]) * 38, yv + 55, z_carina - 15]
        centre = [ax[np.abs(ax - c).argmin()] for ax, c in zip(axes, centre)]
    ptv_high = random_blob(axes, rng, centre, rng.integers(1, 4), (14.0, 30.0), 6.0) & inside
    tumour = _erode(ptv_high)
    ct[tumour] = 35.0 + 20 * texture[tumour]
    for _ in range(100):
        node = [rng.uniform(-12, 12), yv + rng.uniform(45, 65), z_carina + rng.uniform(-35, 15)]
        node = [ax[np.abs(ax - c).argmin()] for ax, c in zip(axes, node)]
        ptv_low = random_blob(axes, rng, node, rng.integers(1, 4), (10.0, 20.0), 6.0) & inside
        ptv_low &= ~ptv_high
        if ptv_low.any():
            break
    structures = {"PTV_high": ptv_high, "PTV_low": ptv_low, "SpinalCord": cord > 0,
                  "Esophagus": esophagus > 0, "Heart": heart > 0, "Lung_L": lungs["Lung_L"] > 0,
                  "Lung_R": lungs["Lung_R"] > 0, "Body": inside}
    return ct, structures


def _plan_dose(rng, ct, structures, spacing: float, prescription: float) -> np.ndarray:
    """Dose (Gy) of a coplanar multi-beam plan: each beam's fluence covers the targets' projection
    (lower on rays through only the low-dose PTV, spared on rays through the cord and heart),
    attenuated with radiological depth after a build-up region, with inverse-square fall-off,
    penumbra and a broad scatter term; scaled so the median PTV_high dose is the prescription."""
    size = ct.shape[0]
    ptv_high = structures["PTV_high"]
    density = np.clip(1 + ct / 1000, 0, 2).astype(np.float32)  # relative electron density
    # The masks that shape the beams, packed one per bit so one nearest-neighbour rotation
    # moves them all: PTV_high, PTV_low, then the spared organs.
    names = ("PTV_high", "PTV_low", "SpinalCord", "Heart")
    packed = sum(structures[n].astype(np.uint8) << k for k, n in enumerate(names)).astype(np.uint8)
    low_level = rng.uniform(0.75, 0.88)
    sparing = (rng.uniform(0.4, 0.7), rng.uniform(0.1, 0.3))  # cord, heart
    mm = (np.arange(size) - (size - 1) / 2) * spacing
    centre = [mm[idx].mean() for idx in np.nonzero(ptv_high)]
    n_beams = rng.integers(5, 10)
    towards = math.atan2(centre[1], centre[0])  # gather beams on the tumour's side
    span = math.radians(rng.uniform(200, 360))
    angles = towards + span * ((np.arange(n_beams) + 0.5) / n_beams - 0.5)
    angles += np.radians(rng.normal(0, 5, n_beams))
    beams = []  # (angle, fluence (X, Z), depth dose (X, Y, Z)), all in the beam's frame
    for angle, weight in zip(angles, rng.uniform(0.75, 1.25, n_beams)):
        # In the rotated frame the beam travels along +y (axis 1).
        dens = _rotate_xy(density, angle)
        bits = _rotate_xy(packed, angle, nearest=True)
        shadows = [(np.bitwise_or.reduce(bits, axis=1) >> k) & 1 for k in range(len(names))]
        aperture = np.maximum(shadows[0], low_level * shadows[1]).astype(np.float32)  # (X, Z)
        # Field edge ~6 mm outside the targets' projection, then a Gaussian penumbra.
        aperture = _dilate_2d(aperture, max(1, round(6 / spacing)))
        fluence = weight * gaussian_filter(aperture, 4.0, spacing, 3, ndim=2)
        for shadow, spare in zip(shadows[2:], sparing):
            shadow = gaussian_filter(shadow.astype(np.float32), 5.0, spacing, 3, ndim=2)
            fluence *= 1 - spare * np.clip(shadow, 0, 1)
        depth = (np.cumsum(dens, axis=1) - 0.5 * dens) * spacing  # water-equivalent mm
        depth_dose = (1 - 0.75 * np.exp(-depth / 5)) * np.exp(-0.0045 * depth)
        in_target = (bits & 1).sum(axis=(0, 2))
        iso = (in_target * mm).sum() / max(in_target.sum(), 1)
        depth_dose *= ((1000 / (1000 + mm - iso)) ** 2)[None, :, None]  # inverse square
        beams.append((angle, fluence, depth_dose.astype(np.float32)))

    pad = int(3 * 25 / spacing) + 1
    target = np.where(ptv_high, 1.0, np.where(structures["PTV_low"], low_level, 0.0))
    for step in range(3):
        dose = sum(_rotate_xy(fluence[:, None, :] * depth_dose, -angle)
                   for angle, fluence, depth_dose in beams)
        # Short-range electron transport and a broad scatter halo.
        dose = gaussian_filter(dose, 4.0, spacing, pad, halo=(25.0, 0.08))
        dose = np.where(structures["Body"], np.clip(dose, 0, None), 0).astype(np.float32)
        dose /= np.median(dose[ptv_high])
        if step == 2:
            break
        # Fluence modulation, as an optimiser would: scale each ray by the mean ratio of the
        # wanted to the delivered dose over the target voxels it crosses.
        ratio = np.where(target > 0, target / np.maximum(dose, 1e-3), 0).astype(np.float32)
        for k, (angle, fluence, depth_dose) in enumerate(beams):
            seen = _rotate_xy(ratio, angle, nearest=True)
            count = (seen > 0).sum(axis=1)
            correction = np.where(count > 0, seen.sum(axis=1) / np.maximum(count, 1), 1.0)
            beams[k] = (angle, fluence * np.clip(correction, 0.7, 1.4), depth_dose)
    return (dose * prescription).astype(np.float32)


def dose_phantom(size: int = 48, seed: int = 0) -> dict:
    """One synthetic thorax patient for dose prediction.

    Returns {"ct": float32 HU (X, Y, Z), "dose": float32 Gy, "structures": {name: bool array}
    for every name in DOSE_STRUCTURES, "affine": 4x4, "prescription_gy": float}.
    """
    check_int("size", size, 24)
    rng_anat, rng_plan, rng_noise = spawn_rngs(seed, 3)
    spacing = _DOSE_FOV_MM / size
    ct, structures = _thorax(rng_anat, size, spacing)
    prescription = float(np.round(60 * rng_plan.uniform(0.9, 1.1), 1))
    dose = _plan_dose(rng_plan, ct, structures, spacing, prescription)
    ct = np.clip(ct + rng_noise.normal(0, 12, ct.shape).astype(np.float32), -1024, 3071)
    return {"ct": ct, "dose": dose, "structures": structures,
            "affine": centred_affine(size, spacing), "prescription_gy": prescription}


def generate_dose_phantoms(out_dir, n_patients: int = 12, size: int = 48, seed: int = 0,
                           progress: bool = True) -> Path:
    """Write a set of thorax dose phantoms and return the path of its manifest.csv.

    Files: pt-000_ct.nii.gz (float32 HU), pt-000_dose.nii.gz (float32 Gy), one uint8
    pt-000_<structure>.nii.gz per name in DOSE_STRUCTURES, and manifest.csv with columns
    patient,ct,dose,<structures> (paths relative to the manifest). Written and reused like
    `generate_brain_phantoms`.
    """
    check_int("size", size, 24)
    check_int("n_patients", n_patients, 1)
    check_int("seed", seed, 0)
    seeds = [member_seed(seed, i) for i in range(n_patients)]
    params = {"kind": "dose", "format_version": PHANTOM_FORMAT_VERSION,
              "n_patients": int(n_patients), "size": int(size), "seed": int(seed),
              "patient_seeds": seeds}

    def write_patient(folder: Path, i: int) -> list:
        patient = dose_phantom(size, seeds[i])
        name = f"pt-{i:03d}"
        files = {"ct": patient["ct"], "dose": patient["dose"]}
        files.update({k: v.astype(np.uint8) for k, v in patient["structures"].items()})
        for key, array in files.items():
            save_nifti(folder / f"{name}_{key}.nii.gz", array, patient["affine"])
        return [name] + [f"{name}_{key}.nii.gz" for key in files]

    header = ["patient", "ct", "dose", *DOSE_STRUCTURES]
    return write_phantom_set(out_dir, params, header, n_patients, write_patient,
                             "dose phantoms", progress)
