"""Dose-prediction data: normalisation, resampling, the dose cache and its two datasets."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from ddpm.caching import StaleCacheError
from ddpm.config import DoseDataConfig
from ddpm.dose_cache import (
    body_mask,
    build_dose_cache,
    ct_to_model,
    dose_to_gy,
    ensure_dose_cache,
    fill_holes_axial,
    gy_to_dose,
    load_dose_meta,
    read_dose_manifest,
    resample_to_spacing,
)
from ddpm.dose_data import DosePatchDataset, DoseVolumeDataset
from ddpm.nifti_inputs import CacheError, DataWarning

SHAPE = (14, 12, 10)
STRUCTURES = ("PTV60", "Rectum")


def _affine(spacing=(2.0, 2.0, 3.0)):
    return np.diag([*spacing, 1.0])


def patient_volumes(seed=0, shape=SHAPE):
    """A body ellipsoid (soft tissue, a lung-like air pocket), a PTV ball, an OAR ball and a
    dose falling off from the PTV centre (60 Gy peak)."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    r2 = sum(((idx[a] - centre[a]) / (0.45 * shape[a])) ** 2 for a in range(3))
    ct = np.where(r2 < 1, 40.0 + rng.normal(0, 5, shape), -1000.0).astype(np.float32)
    ct[(r2 < 0.15) & (idx[0] < centre[0] - 1)] = -800.0  # air pocket inside the body
    ptv_centre = centre + rng.uniform(-1, 1, 3)
    d2 = sum((idx[a] - ptv_centre[a]) ** 2 for a in range(3))
    ptv = (d2 < 2.2**2).astype(np.uint8)
    oar = (sum((idx[a] - centre[a] - (3, -2, 0)[a]) ** 2 for a in range(3)) < 1.6**2)
    dose = (60.0 * np.exp(-d2 / 18.0) * (r2 < 1)).astype(np.float32)
    return {"ct": ct, "dose": dose, "PTV60": ptv, "Rectum": oar.astype(np.uint8)}


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), str(path))
    return path


def write_manifest(folder, rows, columns=("patient", "ct", "dose", *STRUCTURES)):
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def make_patients(folder, n=4, shape=SHAPE, affine=None):
    """n good patients as NIfTI files plus a manifest; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = [f"pt{i}"]
        for key, volume in patient_volumes(seed=i, shape=shape).items():
            save(folder / f"pt{i}_{key}.nii.gz", volume, affine)
            row.append(f"pt{i}_{key}.nii.gz")
        rows.append(row)
    return write_manifest(folder, rows)


def config(tmp_path, manifest, **kw):
    values = dict(source="manifest", manifest=str(manifest),
                  cache_dir=str(tmp_path / "caches" / "dose"), split_fractions=[0.5, 0.25, 0.25],
                  patch_size=8)
    values.update(kw)
    return DoseDataConfig(**values)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A dose cache of 4 patients (2 train, 1 val, 1 test) at the source spacing."""
    tmp = tmp_path_factory.mktemp("dose")
    cfg = config(tmp, make_patients(tmp / "data"))
    build_dose_cache(cfg, progress=False)
    return cfg


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else []


# ----------------------------------------------------------------------------- normalisation


def test_dose_round_trip_gy_to_model_space_and_back_is_exact():
    gy = np.random.default_rng(0).uniform(0, 95, 1000)
    np.testing.assert_allclose(dose_to_gy(gy_to_dose(gy, 80.0), 80.0), gy, rtol=0, atol=1e-12)
    t = torch.linspace(0, 80, 101)
    torch.testing.assert_close(dose_to_gy(gy_to_dose(t, 80.0), 80.0), t, rtol=1e-6, atol=1e-5)


def test_dose_scale_maps_zero_to_minus_one_and_the_scale_to_plus_one():
    assert gy_to_dose(0.0, 80.0) == -1.0 and gy_to_dose(80.0, 80.0) == 1.0
    assert gy_to_dose(40.0, 80.0) == 0.0


def test_ct_window_is_clipped_and_mapped_to_minus_one_plus_one():
    hu = np.array([-3000.0, -1000.0, 250.0, 1500.0, 3000.0])
    np.testing.assert_allclose(ct_to_model(hu, [-1000, 1500]), [-1, -1, 0, 1, 1])


# ----------------------------------------------------------------------------- resampling


def test_resampling_keeps_the_field_of_view_and_reaches_the_requested_spacing():
    affine = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    shape = (9, 12, 7)
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)
    ramp = (world[0] + 2 * world[1] - world[2]).astype(np.float32)  # linear in mm
    out, new_affine = resample_to_spacing(ramp, affine, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(nib.affines.voxel_sizes(new_affine), [1, 1, 1], atol=1e-12)
    old_extent, new_extent = np.array(shape) * [2, 1.5, 3], np.array(out.shape) * 1.0
    assert np.all(np.abs(new_extent - old_extent) <= 0.5)
    centre = lambda a, s: a @ np.append((np.array(s) - 1) / 2, 1.0)  # noqa: E731
    np.testing.assert_allclose(centre(new_affine, out.shape), centre(affine, shape), atol=1e-9)
    # Trilinear interpolation is exact on a linear function wherever it does not extrapolate.
    new_ijk = np.indices(out.shape).reshape(3, -1)
    new_world = (new_affine[:3, :3] @ new_ijk + new_affine[:3, 3:]).reshape(3, *out.shape)
    expected = new_world[0] + 2 * new_world[1] - new_world[2]
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)


def test_resampled_masks_stay_binary_and_keep_their_volume():
    ball = patient_volumes()["PTV60"].astype(np.float32)
    out, affine = resample_to_spacing(ball, _affine(), [1.0, 1.0, 1.0], kind="nearest")
    assert set(np.unique(out)) <= {0.0, 1.0}
    old_mm3, new_mm3 = ball.sum() * 12.0, out.sum() * 1.0
    assert abs(new_mm3 - old_mm3) / old_mm3 < 0.25


def test_same_spacing_returns_the_volume_unchanged():
    ct = patient_volumes()["ct"]
    out, affine = resample_to_spacing(ct, _affine(), [2.0, 2.0, 3.0])
    assert out is ct and np.array_equal(affine, _affine())


# ----------------------------------------------------------------------------- body mask


def test_body_mask_fills_air_inside_the_body_but_not_outside():
    ct = patient_volumes()["ct"]
    body = body_mask(ct, {})
    assert not body[0, 0, 0]  # air around the patient
    assert body[(ct == -800.0)].all()  # the air pocket inside the body is filled
    np.testing.assert_array_equal(fill_holes_axial(np.ones((3, 3, 1), bool)),
                                  np.ones((3, 3, 1), bool))


def test_a_structure_named_body_is_used_as_the_body_mask():
    ct = patient_volumes()["ct"]
    external = np.zeros(SHAPE, bool)
    external[3:6, 3:6, 3:6] = True
    np.testing.assert_array_equal(body_mask(ct, {"External": external}), external)


# ----------------------------------------------------------------------------- the cache


def test_cache_holds_anatomy_dose_and_masks_per_patient_with_meta(cache):
    meta = load_dose_meta(cache.cache_dir)
    assert meta["structures"] == list(STRUCTURES) and meta["ptvs"] == ["PTV60"]
    assert meta["spacing_mm"] == [2.0, 2.0, 3.0]
    assert meta["normalisation"]["dose_scale_gy"] == 80.0
    names = [n for s in ("train", "val", "test") for n in meta["splits"][s]["patients"]]
    assert sorted(names) == ["pt0", "pt1", "pt2", "pt3"]  # every patient in exactly one split
    files = meta["patients"]["pt0"]["files"]
    anatomy = np.load(f"{cache.cache_dir}/{files['anatomy']}")
    masks = np.load(f"{cache.cache_dir}/{files['masks']}")
    assert anatomy.shape == (3, *SHAPE) and anatomy.dtype == np.float32
    assert masks.shape == (3, *SHAPE) and masks.dtype == bool
    assert set(np.unique(anatomy[1:])) == {-1.0, 1.0}
    np.testing.assert_array_equal(anatomy[1] > 0, patient_volumes(0)["PTV60"] > 0)


def test_cached_dose_converts_back_to_the_source_gy(cache):
    meta = load_dose_meta(cache.cache_dir)
    files = meta["patients"]["pt2"]["files"]
    dose = np.load(f"{cache.cache_dir}/{files['dose']}")
    source = patient_volumes(seed=2)["dose"]
    np.testing.assert_allclose(dose_to_gy(dose[0], 80.0), source, rtol=0, atol=1e-4)


def test_cache_resamples_every_patient_to_the_configured_spacing(tmp_path):
    cfg = config(tmp_path, make_patients(tmp_path / "data", n=3), spacing_mm=[3.0, 3.0, 3.0],
                 split_fractions=[1.0, 0.0, 0.0])
    build_dose_cache(cfg, progress=False)
    meta = load_dose_meta(cfg.cache_dir)
    assert meta["spacing_mm"] == [3.0, 3.0, 3.0]
    for info in meta["patients"].values():
        assert info["shape"] == [9, 8, 10]  # round(14 * 2 / 3), round(12 * 2 / 3), 10
        np.testing.assert_allclose(nib.affines.voxel_sizes(np.array(info["affine"])), 3.0)


def test_ensure_builds_when_absent_and_reuses_a_matching_cache(tmp_path):
    cfg = config(tmp_path, make_patients(tmp_path / "data", n=3))
    path = ensure_dose_cache(cfg, progress=False)
    stamp = (path / "meta.yaml").stat().st_mtime_ns
    assert ensure_dose_cache(cfg, progress=False) == path
    assert (path / "meta.yaml").stat().st_mtime_ns == stamp


def test_cache_refuses_stale_settings_naming_the_field(cache):
    stale = config(Path(cache.cache_dir).parent, cache.manifest, cache_dir=cache.cache_dir,
                   dose_scale_gy=70.0)
    with pytest.raises(StaleCacheError, match=r"data\.dose_scale_gy: config 70\.0 vs cache 80\.0"):
        ensure_dose_cache(stale)


def test_phantom_source_generates_the_phantoms_then_caches_them(tmp_path):
    cfg = DoseDataConfig(root=str(tmp_path / "phantoms"), n_patients=3, phantom_size=24,
                         cache_dir=str(tmp_path / "cache"), split_fractions=[0.34, 0.33, 0.33])
    ensure_dose_cache(cfg, progress=False)
    assert (tmp_path / "phantoms" / "manifest.csv").is_file()
    meta = load_dose_meta(cfg.cache_dir)
    assert len(meta["patients"]) == 3 and meta["ptvs"]
    assert all(p["shape"] == [24, 24, 24] and p["ptv_voxels"] > 0
               for p in meta["patients"].values())
    cfg.phantom_seed = 1
    with pytest.raises(StaleCacheError, match="data.phantom_seed: config 1 vs cache 0"):
        ensure_dose_cache(cfg, progress=False)


# ----------------------------------------------------------------------------- bad input


def _one_bad(tmp_path, change):
    """A manifest of 3 patients where ``change(folder, rows)`` spoils patient pt1."""
    folder = tmp_path / "data"
    manifest = make_patients(folder, n=3)
    with manifest.open() as f:
        rows = list(csv.reader(f))[1:]
    change(folder, rows)
    return config(tmp_path, write_manifest(folder, rows))


def _expect_rejection(cfg, *patterns):
    with pytest.raises(CacheError) as info:
        build_dose_cache(cfg, progress=False)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    cache_dir = Path(cfg.cache_dir)
    assert not cache_dir.exists() and not leftovers(cache_dir.parent)


def test_missing_file_is_named_with_its_column(tmp_path):
    cfg = _one_bad(tmp_path, lambda folder, rows: (folder / "pt1_dose.nii.gz").unlink())
    _expect_rejection(cfg, "pt1", "column 'dose'", "pt1_dose.nii.gz", "not found")


def test_missing_column_is_named(tmp_path):
    manifest = write_manifest(tmp_path, [["pt0", "a.nii.gz", "PTV.nii.gz"]],
                              columns=("patient", "ct", "PTV"))
    with pytest.raises(CacheError, match=r"lacks column\(s\) \['dose'\]"):
        read_dose_manifest(manifest)


def test_structure_of_another_shape_is_rejected_naming_both_files(tmp_path):
    def change(folder, rows):
        save(folder / "pt1_Rectum.nii.gz", np.zeros((6, 6, 6), np.uint8))

    _expect_rejection(_one_bad(tmp_path, change), "column 'Rectum'", "pt1_Rectum.nii.gz",
                      "pt1_ct.nii.gz", "shape")


def test_dose_on_a_shifted_grid_is_rejected(tmp_path):
    def change(folder, rows):
        moved = _affine()
        moved[0, 3] = 5.0
        save(folder / "pt1_dose.nii.gz", patient_volumes(1)["dose"], moved)

    _expect_rejection(_one_bad(tmp_path, change), "column 'dose'", "affines disagree")


def test_nan_dose_is_rejected_naming_the_file(tmp_path):
    def change(folder, rows):
        dose = patient_volumes(1)["dose"]
        dose[2, 2, 2] = np.nan
        save(folder / "pt1_dose.nii.gz", dose)

    _expect_rejection(_one_bad(tmp_path, change), "pt1_dose.nii.gz", "NaN")


def test_negative_dose_is_rejected(tmp_path):
    def change(folder, rows):
        save(folder / "pt1_dose.nii.gz", patient_volumes(1)["dose"] - 5.0)

    _expect_rejection(_one_bad(tmp_path, change), "pt1_dose.nii.gz", "negative doses")


def test_dose_above_the_scale_is_accepted_with_a_warning(tmp_path):
    cfg = config(tmp_path, make_patients(tmp_path / "data", n=3), dose_scale_gy=50.0)
    with pytest.warns(DataWarning, match="exceeds data.dose_scale_gy=50"):
        build_dose_cache(cfg, progress=False)


def test_failed_rebuild_leaves_the_previous_cache_intact(tmp_path):
    manifest = make_patients(tmp_path / "data", n=3)
    cfg = config(tmp_path, manifest)
    build_dose_cache(cfg, progress=False)
    before = (tmp_path / "caches" / "dose" / "meta.yaml").read_text()
    (tmp_path / "data" / "pt2_ct.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(CacheError, match="pt2_ct.nii.gz"):
        build_dose_cache(cfg, progress=False)
    assert (tmp_path / "caches" / "dose" / "meta.yaml").read_text() == before
    assert not leftovers(tmp_path / "caches")


# ----------------------------------------------------------------------------- datasets


def test_patch_items_have_the_patch_shape_and_model_range(cache):
    ds = DosePatchDataset(cache.cache_dir, "train", patch_size=8, samples_per_epoch=10)
    item = ds[3]
    assert item["anatomy"].shape == (3, 8, 8, 8) and item["anatomy"].dtype == torch.float32
    assert item["dose"].shape == (1, 8, 8, 8) and item["dose"].dtype == torch.float32
    assert item["anatomy"].min() >= -1 and item["anatomy"].max() <= 1
    assert len(ds) == 10


def test_default_epoch_covers_each_patient_volume_about_once(cache):
    ds = DosePatchDataset(cache.cache_dir, "train", patch_size=8)
    assert len(ds) == 2 * 4  # ceil(14 * 12 * 10 / 512) = 4 patches for each of 2 patients


def test_patches_depend_only_on_seed_and_index(cache):
    a = DosePatchDataset(cache.cache_dir, "train", patch_size=8, samples_per_epoch=50, seed=1)
    b = DosePatchDataset(cache.cache_dir, "train", patch_size=8, samples_per_epoch=50, seed=1)
    _ = [b[i] for i in (40, 2, 17)]  # a different access history
    for i in (17, 2, 40):
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
    c = DosePatchDataset(cache.cache_dir, "train", patch_size=8, samples_per_epoch=50, seed=2)
    assert any(not torch.equal(a[i]["dose"], c[i]["dose"]) for i in range(10))


def test_ptv_fraction_biases_patches_towards_the_target(cache):
    def fraction_with_ptv(ptv_fraction):
        ds = DosePatchDataset(cache.cache_dir, "train", patch_size=4,
                              ptv_fraction=ptv_fraction, samples_per_epoch=300)
        return np.mean([bool((ds[i]["anatomy"][1] > 0).any()) for i in range(len(ds))])

    uniform, biased = fraction_with_ptv(0.0), fraction_with_ptv(0.5)
    always = fraction_with_ptv(1.0)
    assert always == 1.0
    # Half the patches are centred on the PTV, the other half hit it as often as uniform ones.
    assert biased > 0.5 + 0.5 * uniform - 0.1
    assert uniform < 0.5  # the comparison would say little if uniform patches held the PTV


def test_patch_larger_than_the_volume_is_padded_with_background(cache):
    ds = DosePatchDataset(cache.cache_dir, "train", patch_size=16, samples_per_epoch=4)
    item = ds[0]
    assert item["anatomy"].shape == (3, 16, 16, 16)
    # 14 x 12 x 10 voxels sit in the middle; the rest is air, outside every mask, 0 Gy.
    assert (item["anatomy"][:, :, :, :3] == -1).all() and (item["dose"][..., 13:] == -1).all()
    assert (item["anatomy"][0, 1:15, 2:14, 3:13] > -1).any()


def test_patch_loader_batches_with_workers_like_without(cache):
    ds = DosePatchDataset(cache.cache_dir, "train", patch_size=8, samples_per_epoch=6)
    plain = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    pooled = next(iter(torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2)))
    torch.testing.assert_close(plain, pooled, rtol=0, atol=0)


def test_volume_items_hold_everything_evaluation_needs(cache):
    ds = DoseVolumeDataset(cache.cache_dir, "test")
    assert len(ds) == 1
    item = ds[0]
    assert item["anatomy"].shape == (3, *SHAPE) and item["dose"].shape == (1, *SHAPE)
    assert item["body"].dtype == bool and item["body"].shape == SHAPE
    assert set(item["structures"]) == set(STRUCTURES)
    assert item["spacing_mm"] == [2.0, 2.0, 3.0]
    source = patient_volumes(seed=int(item["patient"][2:]))
    np.testing.assert_array_equal(item["structures"]["PTV60"], source["PTV60"] > 0)
    assert item["body"][item["structures"]["PTV60"]].all()  # structures lie inside the body


def test_unknown_split_is_refused(cache):
    with pytest.raises(ValueError, match="split 'holdout'"):
        DoseVolumeDataset(cache.cache_dir, "holdout")


def test_meta_records_the_normalisation_needed_to_convert_predictions(cache):
    meta = yaml.safe_load(open(f"{cache.cache_dir}/meta.yaml"))
    assert meta["normalisation"]["ct_window"] == [-1000.0, 1500.0]
    assert meta["settings_hash"] and meta["ddpm_version"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dose_to_gy(1.0, meta["normalisation"]["dose_scale_gy"]) == 80.0
