"""Slice cache: validation of every bad input, geometry handling, contents, staleness."""

from __future__ import annotations

import csv
import gzip
import types
import warnings

import nibabel as nib
import numpy as np
import pytest
import yaml

from ddpm.caching import (
    StaleCacheError,
    build_cache,
    ensure_cache,
    load_meta,
    split_subjects,
    verify_cache,
)
from ddpm.nifti_inputs import (
    CacheError,
    DataWarning,
    Subject,
    check_subjects,
    find_folder_subjects,
)

SHAPE = (24, 24, 16)


def head_volume(seed=0, shape=SHAPE, lesion=True):
    """Ellipsoid 'head' with a smooth intensity gradient, noise and one bright lesion ball."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    r2 = sum(((idx[a] - centre[a]) / (0.45 * shape[a])) ** 2 for a in range(3))
    image = np.where(r2 < 1, 100 + 60 * (1 - r2) + rng.normal(0, 4, shape), 0)
    mask = np.zeros(shape, np.uint8)
    if lesion:
        c = centre + rng.uniform(-2, 2, 3)
        mask[sum((idx[a] - c[a]) ** 2 for a in range(3)) < 2.5**2] = 1
        image[mask > 0] += 80
    return image.astype(np.float32), mask


def save(path, data, affine=None, header=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine, header)
    nib.save(img, str(path))
    return path


def write_manifest(folder, rows):
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "image", "mask"])
        writer.writerows(rows)
    return path


def make_subjects(folder, n=4, ext=".nii.gz"):
    """n good subjects as image/mask files plus a manifest; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, mask = head_volume(seed=i, lesion=i % 2 == 0)
        save(folder / f"s{i}_image{ext}", image)
        save(folder / f"s{i}_mask{ext}", mask)
        rows.append([f"s{i}", f"s{i}_image{ext}", f"s{i}_mask{ext}"])
    return write_manifest(folder, rows)


def config(tmp_path, manifest, **kw):
    values = dict(source="manifest", root=str(tmp_path / "data"), manifest=str(manifest),
                  image_glob="*_image.nii*", mask_glob="*_mask.nii*", n_subjects=4,
                  phantom_size=24, phantom_seed=0, cache_dir=str(tmp_path / "caches" / "c"),
                  image_size=16, z_range=[2, 13], n_bins=4, split_fractions=[0.5, 0.25, 0.25],
                  split_seed=0, clip_percentiles=[0.5, 99.5], mask_threshold=0.5,
                  lesion_min_voxels=1, oversample_lesions=1.0, num_workers=0)
    values.update(kw)
    return types.SimpleNamespace(**values)


def build(cfg, **kw):
    return build_cache(cfg, progress=False, **kw)


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "caches").exists()


@pytest.fixture
def good(tmp_path):
    return make_subjects(tmp_path / "data")


def replace_subject(manifest, i, image=None, mask=None, affine=None):
    """Overwrite subject i's image and/or mask file with new data."""
    folder = manifest.parent
    if image is not None:
        save(folder / f"s{i}_image.nii.gz", image, affine)
    if mask is not None:
        save(folder / f"s{i}_mask.nii.gz", mask, affine)


# ----------------------------------------------------------------------------- bad input


def test_missing_file_is_rejected_by_name(tmp_path, good):
    (good.parent / "s1_mask.nii.gz").unlink()
    with pytest.raises(CacheError, match=r"s1: mask file not found: .*s1_mask\.nii\.gz"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_file_is_rejected(tmp_path, ext):
    manifest = make_subjects(tmp_path / "data", ext=ext)
    path = manifest.parent / f"s2_image{ext}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"s2: image .*s2_image\.nii(\.gz)? is truncated or un"):
        build(config(tmp_path, manifest))
    assert_nothing_written(tmp_path)


def test_file_that_is_not_nifti_is_rejected(tmp_path, good):
    (good.parent / "s0_image.nii.gz").write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(CacheError, match=r"s0: image .*s0_image\.nii\.gz is not a readable NIfTI"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_image_and_mask_of_different_shape_are_rejected(tmp_path, good):
    replace_subject(good, 1, mask=np.zeros((24, 24, 12), np.uint8))
    with pytest.raises(CacheError, match=r"s1: .*differ in shape.*\(24, 24, 16\) vs \(24, 24, 12"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_disagreeing_affines_are_rejected(tmp_path, good):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # two voxels off
    _, mask = head_volume(seed=1)
    replace_subject(good, 1, mask=mask, affine=shifted)
    with pytest.raises(CacheError, match=r"s1: .*affines disagree: grids differ by up to 2 mm"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_tiny_affine_difference_is_accepted(tmp_path, good):
    nudged = np.eye(4)
    nudged[0, 3] = 1e-4  # float rounding between tools
    _, mask = head_volume(seed=1, lesion=False)
    replace_subject(good, 1, mask=mask, affine=nudged)
    assert all(c.status == "ok" for c in check_subjects(_subjects(good), config(tmp_path, good)))


def _subjects(manifest):
    from ddpm.nifti_inputs import read_manifest

    return read_manifest(manifest)


def test_nan_voxels_are_repaired_with_a_warning(tmp_path, good):
    image, _ = head_volume(seed=3)
    image[0, 0, 5] = np.nan
    image[1, 0, 5] = np.inf
    replace_subject(good, 3, image=image)
    with pytest.warns(DataWarning, match=r"s3: image .*2 NaN/Inf voxels set to the volume minimum"):
        build(config(tmp_path, good))
    meta = load_meta(tmp_path / "caches" / "c")
    assert any("NaN/Inf" in w for w in meta["warnings"])
    for split in ("train", "val", "test"):
        assert np.isfinite(np.load(tmp_path / "caches" / "c" / f"{split}.npy")).all()


def test_all_zero_image_is_rejected(tmp_path, good):
    replace_subject(good, 0, image=np.zeros(SHAPE, np.float32))
    with pytest.raises(CacheError, match=r"s0: image .*s0_image\.nii\.gz is all zeros"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_multi_label_mask_counts_every_positive_label_with_a_warning(tmp_path, good):
    _, mask = head_volume(seed=0)
    mask = mask * 2
    mask[10:12, 10:12, 6:8] = 4
    replace_subject(good, 0, mask=mask)
    cfg = config(tmp_path, good, split_fractions=[1.0, 0.0, 0.0], image_size=24)
    with pytest.warns(DataWarning, match=r"s0: mask .* multi-label \(labels 2, 4\)"):
        build(cfg)
    rows = list(csv.DictReader(open(tmp_path / "caches" / "c" / "train.csv")))
    lesion = sum(int(r["lesion_voxels"]) for r in rows if r["subject"] == "s0")
    assert lesion == int((mask[:, :, 2:14] > 0).sum())


def test_negative_mask_labels_are_rejected(tmp_path, good):
    _, mask = head_volume(seed=2)
    replace_subject(good, 2, mask=mask.astype(np.int16) - 1)
    with pytest.raises(CacheError, match=r"s2: mask .* negative labels \(min -1\)"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_4d_file_with_singleton_axis_is_accepted_as_3d(tmp_path, good):
    cfg = config(tmp_path, good, split_fractions=[1.0, 0.0, 0.0])
    build(cfg, out=tmp_path / "plain")
    image, _ = head_volume(seed=1, lesion=False)
    replace_subject(good, 1, image=image[..., None])
    build(cfg, out=tmp_path / "single")
    np.testing.assert_array_equal(np.load(tmp_path / "plain" / "train.npy"),
                                  np.load(tmp_path / "single" / "train.npy"))


def test_4d_series_is_rejected(tmp_path, good):
    image, _ = head_volume(seed=1)
    replace_subject(good, 1, image=np.stack([image, image, image], axis=-1))
    with pytest.raises(CacheError, match=r"s1: image .* is a 4D series .*\(3 volumes\)"):
        build(config(tmp_path, good))
    assert_nothing_written(tmp_path)


def test_z_range_outside_the_volume_is_rejected(tmp_path, good):
    with pytest.raises(CacheError, match=r"z_range \[4, 19\] lies outside image .* 16 slices"):
        build(config(tmp_path, good, z_range=[4, 19]))
    assert_nothing_written(tmp_path)


def test_fewer_subjects_than_splits_need_is_an_error(tmp_path):
    manifest = make_subjects(tmp_path / "data", n=2)
    with pytest.raises(CacheError, match="fewer subjects than splits need: 2 usable"):
        build(config(tmp_path, manifest))
    assert_nothing_written(tmp_path)


def test_every_rejected_subject_is_listed_in_one_error(tmp_path, good):
    (good.parent / "s0_image.nii.gz").unlink()
    replace_subject(good, 3, image=np.zeros(SHAPE, np.float32))
    with pytest.raises(CacheError) as info:
        build(config(tmp_path, good))
    message = str(info.value)
    assert "2 of 4 subjects rejected" in message
    assert "s0: image file not found" in message and "s3: image" in message
    assert_nothing_written(tmp_path)


def test_skip_bad_builds_from_good_subjects_and_records_the_rejected(tmp_path):
    manifest = make_subjects(tmp_path / "data", n=5)
    (manifest.parent / "s4_mask.nii.gz").unlink()
    summary = build(config(tmp_path, manifest), skip_bad=True)
    meta = load_meta(tmp_path / "caches" / "c")
    assert [r["subject"] for r in meta["rejected"]] == ["s4"]
    assert "mask file not found" in meta["rejected"][0]["reasons"][0]
    cached = [s for split in meta["splits"].values() for s in split["subjects"]]
    assert sorted(cached) == ["s0", "s1", "s2", "s3"]
    assert summary.rejected[0]["subject"] == "s4"


def test_failed_rebuild_leaves_the_existing_cache_untouched(tmp_path, good):
    cfg = config(tmp_path, good)
    build(cfg)
    before = (tmp_path / "caches" / "c" / "meta.yaml").read_text()
    replace_subject(good, 2, image=np.zeros(SHAPE, np.float32))
    with pytest.raises(CacheError):
        build(cfg)
    assert (tmp_path / "caches" / "c" / "meta.yaml").read_text() == before
    assert sorted(p.name for p in (tmp_path / "caches").iterdir()) == ["c"]


def test_failure_while_writing_leaves_no_temp_folder_and_keeps_the_old_cache(
        tmp_path, good, monkeypatch):
    cfg = config(tmp_path, good)
    build(cfg)
    before = (tmp_path / "caches" / "c" / "train.npy").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("ddpm.caching.np.savez", disk_full)  # after the arrays are written
    with pytest.raises(OSError, match="No space left"):
        build(config(tmp_path, good, split_seed=7))
    assert sorted(p.name for p in (tmp_path / "caches").iterdir()) == ["c"]
    assert (tmp_path / "caches" / "c" / "train.npy").read_bytes() == before


def test_folder_that_is_not_a_cache_is_never_replaced(tmp_path, good):
    target = tmp_path / "caches" / "c"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not a slice cache"):
        build(config(tmp_path, good))
    assert (target / "notes.txt").read_text() == "mine"


def test_check_subjects_reports_ok_warn_and_reject(tmp_path, good):
    image, _ = head_volume(seed=1)
    image[3, 3, 3] = np.nan
    replace_subject(good, 1, image=image)
    (good.parent / "s2_mask.nii.gz").unlink()
    checks = check_subjects(_subjects(good), config(tmp_path, good))
    assert [c.status for c in checks] == ["ok", "warn", "reject", "ok"]
    assert "mask file not found" in checks[2].reasons[0]


def test_oblique_affine_is_accepted_with_a_warning(tmp_path, good):
    angle = np.radians(10)
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    image, mask = head_volume(seed=1)
    replace_subject(good, 1, image=image, mask=mask, affine=oblique)
    checks = check_subjects(_subjects(good), config(tmp_path, good))
    assert checks[1].status == "warn" and "oblique (10.0 deg)" in checks[1].reasons[0]


# ----------------------------------------------------------------------------- geometry


def _stored_as(image, mask, codes):
    """The same physical volume stored with voxel axes in orientation ``codes``."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(codes))
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    return [nib.Nifti1Image(a, affine).as_reoriented(transform) for a in (image, mask)]


@pytest.mark.parametrize("codes", ["LPS", "LAS", "RSA", "PIR"])
def test_orientation_of_storage_does_not_change_the_cache(tmp_path, codes):
    image, mask = head_volume(seed=5)
    arrays = {}
    for name in ("RAS", codes):
        folder = tmp_path / name
        folder.mkdir()
        img, msk = _stored_as(image, mask, name)
        assert nib.aff2axcodes(img.affine) == tuple(name)
        nib.save(img, str(folder / "a_image.nii.gz"))
        nib.save(msk, str(folder / "a_mask.nii.gz"))
        manifest = write_manifest(folder, [["a", "a_image.nii.gz", "a_mask.nii.gz"]])
        cfg = config(tmp_path, manifest, split_fractions=[1.0, 0.0, 0.0],
                     cache_dir=str(tmp_path / f"cache_{name}"))
        build(cfg)
        arrays[name] = np.load(tmp_path / f"cache_{name}" / "train.npy")
        geometry = load_meta(tmp_path / f"cache_{name}")["geometry"]
        arrays[name + "_affine"] = np.array(geometry["affine"])
    np.testing.assert_array_equal(arrays["RAS"], arrays[codes])
    np.testing.assert_allclose(arrays["RAS_affine"], arrays[codes + "_affine"], atol=1e-4)


def test_big_endian_scaled_int16_matches_float32(tmp_path):
    image, mask = head_volume(seed=6)
    stored = np.round(image).astype(np.int16)  # values the int16 file holds
    folder = tmp_path / "data"
    folder.mkdir()
    save(folder / "f_image.nii.gz", (stored * 0.5 - 20).astype(np.float32))
    scaled = nib.Nifti1Image(stored, np.eye(4), nib.Nifti1Header(endianness=">"))
    scaled.header.set_slope_inter(0.5, -20)  # after construction, which resets the scaling
    nib.save(scaled, str(folder / "i_image.nii.gz"))
    raw = nib.load(str(folder / "i_image.nii.gz"))
    assert raw.get_data_dtype().byteorder == ">" and raw.dataobj.slope == 0.5
    save(folder / "f_mask.nii.gz", mask)
    save(folder / "i_mask.nii.gz", mask)
    caches = {}
    for name in ("f", "i"):
        manifest = write_manifest(folder, [[name, f"{name}_image.nii.gz", f"{name}_mask.nii.gz"]])
        build(config(tmp_path, manifest, split_fractions=[1.0, 0.0, 0.0],
                     cache_dir=str(tmp_path / name)))
        caches[name] = np.load(tmp_path / name / "train.npy")
    np.testing.assert_array_equal(caches["f"], caches["i"])


def test_plain_nii_and_gzipped_nii_give_the_same_cache(tmp_path):
    caches = {}
    for ext in (".nii", ".nii.gz"):
        manifest = make_subjects(tmp_path / f"data{ext}", n=3, ext=ext)
        build(config(tmp_path, manifest, cache_dir=str(tmp_path / f"cache{ext}")))
        caches[ext] = [np.load(tmp_path / f"cache{ext}" / f"{s}.npy")
                       for s in ("train", "val", "test")]
    for a, b in zip(caches[".nii"], caches[".nii.gz"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_square_field_of_view_is_padded_not_stretched(tmp_path):
    image, mask = head_volume(seed=7, shape=(24, 16, 16))
    folder = tmp_path / "data"
    folder.mkdir()
    save(folder / "a_image.nii.gz", image)
    save(folder / "a_mask.nii.gz", mask)
    manifest = write_manifest(folder, [["a", "a_image.nii.gz", "a_mask.nii.gz"]])
    build(config(tmp_path, manifest, split_fractions=[1.0, 0.0, 0.0], image_size=12))
    spacing = load_meta(tmp_path / "caches" / "c")["geometry"]["spacing_mm"]
    assert spacing[0] == pytest.approx(2.0) and spacing[1] == pytest.approx(2.0)
    x = np.load(tmp_path / "caches" / "c" / "train.npy")
    assert (x[:, 0, :, :2] == -1).all() and (x[:, 0, :, -2:] == -1).all()  # 4 padded voxels


def test_anisotropic_voxels_keep_their_physical_aspect(tmp_path):
    # A 14 mm ball on 1 x 2 mm voxels in a 24 x 16 mm field: cached, it must stay round.
    i, j, k = np.indices((24, 8, 16), dtype=np.float32)
    radius2 = (i - 11.5) ** 2 + ((j - 3.5) * 2) ** 2 + (k - 7.5) ** 2
    image = np.where(radius2 < 7**2, 100 + 5 * k, 0).astype(np.float32)  # flat in-plane
    folder = tmp_path / "data"
    folder.mkdir()
    affine = np.diag([1.0, 2.0, 1.0, 1.0])
    save(folder / "a_image.nii.gz", image, affine)
    manifest = write_manifest(folder, [["a", "a_image.nii.gz", ""]])
    build(config(tmp_path, manifest, split_fractions=[1.0, 0.0, 0.0], image_size=12))
    spacing = load_meta(tmp_path / "caches" / "c")["geometry"]["spacing_mm"]
    assert spacing[:2] == pytest.approx([2.0, 2.0])
    middle = np.load(tmp_path / "caches" / "c" / "train.npy")[5, 0]  # z = 7, (12, 12)
    inside = middle > -0.5
    extent_i, extent_j = inside.any(axis=1).sum(), inside.any(axis=0).sum()
    assert abs(extent_i - extent_j) <= 1 and abs(extent_i - 7) <= 1  # 14 mm / 2 mm pixels


# ----------------------------------------------------------------------------- contents


def test_cache_index_agrees_with_the_arrays(tmp_path, good):
    cfg = config(tmp_path, good)
    build(cfg)
    folder = tmp_path / "caches" / "c"
    for split in ("train", "val", "test"):
        x = np.load(folder / f"{split}.npy")
        rows = list(csv.DictReader(open(folder / f"{split}.csv")))
        assert x.dtype == np.float16 and x.shape == (len(rows), 2, 16, 16)
        for row, slice_ in zip(rows, x, strict=True):
            z_bin, pathology = int(row["z_bin"]), int(row["pathology"])
            assert int(row["token"]) == z_bin + pathology * cfg.n_bins
            assert int(row["lesion_voxels"]) == int((slice_[1] == 1).sum())


def test_splits_are_disjoint_and_deterministic():
    names = [f"s{i}" for i in range(10)]
    a = split_subjects(names, [0.6, 0.2, 0.2], seed=3)
    assert a == split_subjects(list(reversed(names)), [0.6, 0.2, 0.2], seed=3)
    assert [len(a[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(a.values(), [])) == sorted(names)


def test_small_splits_still_get_one_subject_each():
    counts = [len(v) for v in split_subjects(list("abc"), [0.9, 0.05, 0.05], 0).values()]
    assert counts == [1, 1, 1]


def test_folder_mode_pairs_images_and_masks_by_subject(tmp_path):
    for name in ("p01", "p02"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "seg").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{name}_t1.nii.gz").write_bytes(b"")
        (tmp_path / "seg" / f"{name}_lesion.nii.gz").write_bytes(b"")
    (tmp_path / "img" / "p03_t1.nii.gz").write_bytes(b"")
    subjects = find_folder_subjects(tmp_path, "img/*_t1.nii.gz", "seg/*_lesion.nii.gz")
    assert [s.name for s in subjects] == ["p01", "p02", "p03"]
    assert subjects[0].mask == tmp_path / "seg" / "p01_lesion.nii.gz"
    assert "no mask matches" in subjects[2].problem


def test_blank_mask_in_manifest_means_no_lesion(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    image, _ = head_volume(seed=1, lesion=False)
    save(folder / "h_image.nii.gz", image)
    manifest = write_manifest(folder, [["h", "h_image.nii.gz", ""]])
    build(config(tmp_path, manifest, split_fractions=[1.0, 0.0, 0.0]))
    x = np.load(tmp_path / "caches" / "c" / "train.npy")
    assert (x[:, 1] == -1).all()


# ----------------------------------------------------------------------------- staleness


def test_stale_cache_is_refused_naming_every_differing_field(tmp_path, good):
    cfg = config(tmp_path, good)
    build(cfg)
    changed = config(tmp_path, good, image_size=8, n_bins=3)
    with pytest.raises(StaleCacheError) as info:
        verify_cache(cfg.cache_dir, changed, config_path="configs/mine.yaml")
    message = str(info.value)
    assert "data.image_size: config 8 vs cache 16" in message
    assert "data.n_bins: config 3 vs cache 4" in message
    assert "data.z_range" not in message
    assert "python cache.py --config configs/mine.yaml" in message


def test_ensure_cache_builds_once_then_verifies(tmp_path, good, capsys):
    cfg = config(tmp_path, good)
    path = ensure_cache(cfg, progress=False)
    assert "building it" in capsys.readouterr().out
    stamp = (path / "meta.yaml").stat().st_mtime_ns
    assert ensure_cache(cfg, progress=False) == path
    assert (path / "meta.yaml").stat().st_mtime_ns == stamp
    with pytest.raises(StaleCacheError, match="data.split_seed"):
        ensure_cache(config(tmp_path, good, split_seed=1), progress=False)


def test_meta_records_rules_geometry_and_settings(tmp_path, good):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean inputs raise no DataWarning
        build(config(tmp_path, good))
    meta = yaml.safe_load((tmp_path / "caches" / "c" / "meta.yaml").read_text())
    assert meta["z_range"] == [2, 13] and meta["n_bins"] == 4 and meta["image_size"] == 16
    assert meta["mask_encoding"]["lesion"] == 1 and meta["mask_encoding"]["background"] == -1
    assert np.array(meta["geometry"]["affine"]).shape == (4, 4)
    assert meta["settings"]["clip_percentiles"] == [0.5, 99.5]
    assert len(meta["settings_hash"]) == 16
    assert set(meta["subjects"]) == {"s0", "s1", "s2", "s3"}


def test_subject_problem_from_lookup_is_a_rejection(tmp_path, good):
    checks = check_subjects([Subject("x", None, None, "", "no image path")],
                            config(tmp_path, good))
    assert checks[0].status == "reject" and checks[0].reasons == ["no image path"]


# ----------------------------------------------------------------------------- phantoms


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """Cache of 6 phantom subjects at 32^3 (generated on the way), z 6..25 in 5 bins."""
    tmp = tmp_path_factory.mktemp("phantoms")
    cfg = types.SimpleNamespace(
        source="phantom", root=str(tmp / "phantoms"), manifest=None, n_subjects=6,
        phantom_size=32, phantom_seed=0, cache_dir=str(tmp / "cache"), image_size=16,
        z_range=[6, 25], n_bins=5, split_fractions=[0.5, 0.25, 0.25], split_seed=0,
        clip_percentiles=[0.5, 99.5], mask_threshold=0.5, lesion_min_voxels=2)
    summary = build_cache(cfg, progress=False)
    return cfg, summary, tmp / "cache"


def _index(folder, split):
    return list(csv.DictReader(open(folder / f"{split}.csv")))


def test_phantom_cache_uses_every_z_bin_in_train(phantom_cache):
    cfg, _, folder = phantom_cache
    assert {int(r["z_bin"]) for r in _index(folder, "train")} == set(range(cfg.n_bins))


def test_phantom_cache_bin_counts_differ_by_at_most_one_per_subject(phantom_cache):
    cfg, _, folder = phantom_cache
    for split in ("train", "val", "test"):
        rows = _index(folder, split)
        per_bin = np.bincount([int(r["z_bin"]) for r in rows], minlength=cfg.n_bins)
        n_subjects = len({r["subject"] for r in rows})
        assert per_bin.max() - per_bin.min() <= n_subjects


def test_phantom_cache_keeps_each_subject_in_one_split(phantom_cache):
    cfg, _, folder = phantom_cache
    owners = {}
    for split in ("train", "val", "test"):
        for subject in {r["subject"] for r in _index(folder, split)}:
            assert subject not in owners, f"{subject} in {owners.get(subject)} and {split}"
            owners[subject] = split
    assert len(owners) == cfg.n_subjects


def test_phantom_cache_holds_images_in_range_and_binary_masks(phantom_cache):
    _, _, folder = phantom_cache
    x = np.concatenate([np.load(folder / f"{s}.npy") for s in ("train", "val", "test")])
    assert x[:, 0].min() >= -1 and x[:, 0].max() <= 1
    assert set(np.unique(x[:, 1]).tolist()) == {-1.0, 1.0}


def test_phantom_cache_index_agrees_with_arrays(phantom_cache):
    cfg, summary, folder = phantom_cache
    for split in ("train", "val", "test"):
        x = np.load(folder / f"{split}.npy", mmap_mode="r")
        rows = _index(folder, split)
        assert len(rows) == len(x) == summary.splits[split]["slices"]
        lesion_pixels = (np.asarray(x[:, 1]) == 1).sum(axis=(1, 2))
        for row, pixels in zip(rows, lesion_pixels, strict=True):
            z_bin, pathology = int(row["z_bin"]), int(row["pathology"])
            assert int(row["token"]) == z_bin + pathology * cfg.n_bins
            assert int(row["lesion_voxels"]) == pixels
            assert (int(row["lesion_voxels"]) > 0) == (pixels > 0)
            assert pathology == int(pixels >= cfg.lesion_min_voxels)
    assert sum(s["lesion_slices"] for s in summary.splits.values()) > 0


def test_phantom_priors_are_per_bin_means_of_training_head_masks(phantom_cache):
    cfg, _, folder = phantom_cache
    priors = np.load(folder / "priors.npz")
    assert priors["head_mask"].shape == (cfg.n_bins, 16, 16) == priors["image"].shape
    assert priors["head_mask"].min() >= 0 and priors["head_mask"].max() <= 1
    assert priors["head_mask"].max() == 1  # the brain centre is head in every subject
    assert priors["count"].sum() == len(_index(folder, "train"))


def test_summary_table_lists_splits_and_bins(phantom_cache):
    _, summary, _ = phantom_cache
    table = summary.table()
    assert "train" in table and "slices per z-bin" in table
    assert len([line for line in table.splitlines() if line[:1].isdigit()]) == 5


# ----------------------------------------------------------------------------- cache.py


def _cache_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "cache.py"
    spec = importlib.util.spec_from_file_location("cache_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _yaml_config(tmp_path, manifest):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {
        "source": "manifest", "manifest": str(manifest),
        "cache_dir": str(tmp_path / "caches" / "c"),
        "image_size": 16, "z_range": [2, 13], "n_bins": 4, "split_fractions": [0.5, 0.25, 0.25],
        "lesion_min_voxels": 1}}))
    return path


def test_cli_check_prints_a_row_per_subject_and_fails_on_a_reject(tmp_path, good, capsys):
    replace_subject(good, 2, image=np.zeros(SHAPE, np.float32))
    assert _cache_script()(["--config", str(_yaml_config(tmp_path, good)), "--check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[:4]] == [["s0", "ok"], ["s1", "ok"],
                                                      ["s2", "reject"], ["s3", "ok"]]
    assert "all zeros" in out[2]
    assert_nothing_written(tmp_path)


def test_cli_check_passes_on_clean_subjects(tmp_path, good):
    assert _cache_script()(["--config", str(_yaml_config(tmp_path, good)), "--check"]) == 0
    assert_nothing_written(tmp_path)


def test_cli_flags_override_the_config(tmp_path, good, capsys):
    other = make_subjects(tmp_path / "other", n=3)
    config_path = _yaml_config(tmp_path, good)
    args = ["--config", str(config_path), "--manifest", str(other), "--out",
            str(tmp_path / "mine"), "--set", "data.image_size=8"]
    assert _cache_script()(args) == 0
    assert "slices per z-bin" in capsys.readouterr().out
    meta = load_meta(tmp_path / "mine")
    assert meta["image_size"] == 8 and meta["settings"]["manifest"] == str(other)
    assert len(meta["subjects"]) == 3


def test_cli_reports_rejected_subjects_and_skip_bad_builds_anyway(tmp_path, capsys):
    manifest = make_subjects(tmp_path / "data", n=5)
    (manifest.parent / "s1_image.nii.gz").unlink()
    config_path = str(_yaml_config(tmp_path, manifest))
    assert _cache_script()(["--config", config_path]) == 2
    assert "s1: image file not found" in capsys.readouterr().err
    assert_nothing_written(tmp_path)
    assert _cache_script()(["--config", config_path, "--skip-bad"]) == 0
    assert "rejected subjects (1)" in capsys.readouterr().out
