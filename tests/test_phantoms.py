"""Specification of the synthetic brain subjects: FLAIR-like head MRI with focal lesions."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ddpm import phantoms
from ddpm.phantoms import brain_phantom, generate_brain_phantoms

HEAD_THRESHOLD = 0.2  # above the background noise (Rician, sigma <= 0.03), below every tissue


def _slice_centres_mm(affine, size):
    return affine[2, 2] * np.arange(size) + affine[2, 3]


def _read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def brain():
    return brain_phantom(64, seed=0, lesion=True)


# --- brain phantoms -------------------------------------------------------------------------

def test_brain_phantom_returns_float_image_uint8_mask_and_affine(brain):
    image, mask, affine = brain
    assert image.shape == mask.shape == (64, 64, 64)
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert affine.shape == (4, 4)


def test_brain_affine_is_ras_with_the_world_origin_at_the_volume_centre(brain):
    affine = brain[2]
    spacing = np.diag(affine)[:3]
    assert np.all(spacing > 0) and np.allclose(spacing, spacing[0])
    assert np.allclose(affine[:3, :3], np.diag(spacing))  # left->right, post->ant, inf->sup
    centre = affine @ np.array([31.5, 31.5, 31.5, 1.0])
    assert np.allclose(centre[:3], 0.0)
    assert 150 < 64 * spacing[0] < 260  # the field of view of a head scan


def test_same_seed_gives_identical_brain_phantoms(brain):
    again = brain_phantom(64, seed=0, lesion=True)
    for a, b in zip(brain, again):
        assert np.array_equal(a, b)


def test_different_seeds_give_different_subjects(brain):
    other_image, other_mask, _ = brain_phantom(64, seed=1, lesion=True)
    assert not np.array_equal(brain[0], other_image)
    assert not np.array_equal(brain[1], other_mask)


def test_head_cross_section_shrinks_towards_the_top(brain):
    image, _, affine = brain
    z_mm = _slice_centres_mm(affine, 64)
    area = (image > HEAD_THRESHOLD).sum(axis=(0, 1))
    peak = area.argmax()
    assert -40 < z_mm[peak] < 30  # widest near the middle of the head
    upper = area[peak:][z_mm[peak:] > 30]
    assert np.all(np.diff(upper) <= 0)  # monotone shrinking over the skull vault
    assert area[np.abs(z_mm - 60).argmin()] < 0.6 * area[peak]
    assert area[-1] == 0  # the field of view ends above the head


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ventricles_darken_the_centre_of_mid_slices_only(seed):
    image, _, affine = brain_phantom(64, seed=seed, lesion=False)
    mm = affine[0, 0] * np.arange(64) + affine[0, 3]
    x, y = np.meshgrid(mm, mm, indexing="ij")
    # Where the lateral ventricles lie, beside (not on) the midline fissure.
    region = (np.abs(x) > 4) & (np.abs(x) < 16) & (y > -30) & (y < 20)
    dark = np.array([(image[:, :, k][region] < HEAD_THRESHOLD).mean() for k in range(64)])
    z_mm = _slice_centres_mm(affine, 64)
    assert dark[(z_mm >= 0) & (z_mm <= 20)].max() > 0.3
    assert dark[(z_mm >= 35) & (z_mm <= 55)].max() < 0.25
    assert dark[(z_mm >= -35) & (z_mm <= -20)].max() < 0.25


def test_lesion_free_subject_has_an_empty_mask():
    _, mask, _ = brain_phantom(64, seed=0, lesion=False)
    assert mask.sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_lesions_lie_well_inside_the_head(seed):
    image, mask, affine = brain_phantom(64, seed=seed, lesion=True)
    assert mask.any()
    head = ndimage.binary_fill_holes(image > HEAD_THRESHOLD)
    depth_mm = ndimage.distance_transform_edt(head, sampling=affine[0, 0])
    assert depth_mm[mask > 0].min() > 10  # below scalp and skull


def test_lesion_free_twin_differs_only_inside_the_mask_where_lesions_are_bright(brain):
    image, mask, _ = brain
    twin, _, _ = brain_phantom(64, seed=0, lesion=False)
    inside = mask > 0
    assert np.array_equal(image[~inside], twin[~inside])
    assert image[inside].mean() > 1.3 * twin[inside].mean()  # hyperintense, FLAIR-like


def test_lesions_occupy_some_but_not_most_head_slices():
    fractions = []
    for seed in range(6):
        image, mask, _ = brain_phantom(64, seed=seed, lesion=True)
        head_slices = (image > HEAD_THRESHOLD).any(axis=(0, 1)).sum()
        fractions.append(mask.any(axis=(0, 1)).sum() / head_slices)
    assert min(fractions) > 0
    assert 0.05 < np.mean(fractions) < 0.5


@pytest.mark.parametrize("kwargs", [{"size": 8}, {"seed": -1}, {"seed": 1.5}])
def test_brain_phantom_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        brain_phantom(**kwargs)


# --- writing brain sets ---------------------------------------------------------------------

def test_generate_brain_phantoms_writes_nifti_and_a_manifest(tmp_path):
    manifest = generate_brain_phantoms(tmp_path / "brains", n_subjects=4, size=32, seed=3,
                                       lesion_fraction=0.5, progress=False)
    rows = _read_manifest(manifest)
    assert rows[0] == ["subject", "image", "mask", "pathology"]
    assert len(rows) == 5
    _, _, expected_affine = brain_phantom(32, seed=0)
    for subject, image_name, mask_name, pathology in rows[1:]:
        image = nib.load(manifest.parent / image_name)
        mask = nib.load(manifest.parent / mask_name)
        assert image.shape == mask.shape == (32, 32, 32)
        assert np.allclose(image.affine, expected_affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        assert int(pathology) == int(np.asarray(mask.dataobj).any())
        assert image_name.startswith(subject)


def test_lesion_fraction_sets_the_number_of_subjects_with_lesions(tmp_path):
    manifest = generate_brain_phantoms(tmp_path / "brains", n_subjects=8, size=16,
                                       lesion_fraction=0.75, progress=False)
    pathology = [int(row[3]) for row in _read_manifest(manifest)[1:]]
    assert sum(pathology) == 6


def test_each_written_subject_is_reproducible_from_its_recorded_seed(tmp_path):
    manifest = generate_brain_phantoms(tmp_path / "brains", n_subjects=2, size=24, seed=5,
                                       progress=False)
    seeds = json.loads((manifest.parent / "phantoms.json").read_text())["subject_seeds"]
    for row, seed in zip(_read_manifest(manifest)[1:], seeds):
        image, mask, _ = brain_phantom(24, seed=seed, lesion=row[3] == "1")
        assert np.array_equal(nib.load(manifest.parent / row[1]).get_fdata(dtype=np.float32),
                              image)
        assert np.array_equal(np.asarray(nib.load(manifest.parent / row[2]).dataobj), mask)


def test_sets_with_different_seeds_share_no_subject(tmp_path):
    a = generate_brain_phantoms(tmp_path / "a", n_subjects=3, size=16, seed=0, progress=False)
    b = generate_brain_phantoms(tmp_path / "b", n_subjects=3, size=16, seed=1, progress=False)
    seeds_a = json.loads((a.parent / "phantoms.json").read_text())["subject_seeds"]
    seeds_b = json.loads((b.parent / "phantoms.json").read_text())["subject_seeds"]
    assert not set(seeds_a) & set(seeds_b)


def test_generating_again_with_the_same_settings_reuses_the_set(tmp_path):
    out = tmp_path / "brains"
    first = generate_brain_phantoms(out, n_subjects=2, size=16, progress=False)
    stamp = first.stat().st_mtime_ns
    second = generate_brain_phantoms(out, n_subjects=2, size=16, progress=False)
    assert second == first and second.stat().st_mtime_ns == stamp


def test_generating_with_other_settings_into_an_existing_set_names_the_difference(tmp_path):
    out = tmp_path / "brains"
    generate_brain_phantoms(out, n_subjects=2, size=16, progress=False)
    with pytest.raises(FileExistsError, match="size=16 .asked 24"):
        generate_brain_phantoms(out, n_subjects=2, size=24, progress=False)


def test_generating_into_a_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_brain_phantoms(tmp_path, n_subjects=1, size=16, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_generating_into_an_empty_folder_fills_it(tmp_path):
    out = tmp_path / "brains"
    out.mkdir()
    manifest = generate_brain_phantoms(out, n_subjects=1, size=16, progress=False)
    assert manifest == out / "manifest.csv" and manifest.is_file()


def test_a_failure_midway_leaves_nothing_half_written(tmp_path, monkeypatch):
    real_save, calls = phantoms.save_nifti, []

    def failing_save(path, array, affine):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(path, array, affine)

    monkeypatch.setattr(phantoms, "save_nifti", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_brain_phantoms(tmp_path / "brains", n_subjects=3, size=16, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder


def test_generate_brain_phantoms_rejects_a_bad_lesion_fraction(tmp_path):
    with pytest.raises(ValueError, match="lesion_fraction"):
        generate_brain_phantoms(tmp_path / "brains", lesion_fraction=1.5, progress=False)
