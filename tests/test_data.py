"""SliceDataset and the lesion sampler over a small cache built from synthetic volumes."""

from __future__ import annotations

import csv
import types

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from ddpm.caching import StaleCacheError, build_cache
from ddpm.data import SliceDataset, lesion_sampler

N_BINS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A 6-subject cache (24x24x16 volumes, 16x16 slices, z 2..13, 4 bins), half with lesions."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    idx = np.indices((24, 24, 16), dtype=np.float32)
    r2 = ((idx[0] - 11.5) / 10) ** 2 + ((idx[1] - 11.5) / 10) ** 2 + ((idx[2] - 7.5) / 7) ** 2
    rows = []
    for s in range(6):
        image = np.where(r2 < 1, 100 + 50 * (1 - r2) + rng.normal(0, 3, r2.shape), 0)
        mask = np.zeros(r2.shape, np.uint8)
        if s % 2:
            mask[9:14, 9:14, 4 + s:8 + s] = 1
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(root / f"{s}_i.nii"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / f"{s}_m.nii"))
        rows.append([f"sub{s}", f"{s}_i.nii", f"{s}_m.nii"])
    with (root / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["subject", "image", "mask"], *rows])
    cfg = types.SimpleNamespace(
        source="manifest", manifest=str(root / "manifest.csv"), cache_dir=str(root / "cache"),
        image_size=16, z_range=[2, 13], n_bins=N_BINS, split_fractions=[0.67, 0.17, 0.16],
        split_seed=0, clip_percentiles=[0.5, 99.5], mask_threshold=0.5, lesion_min_voxels=1)
    build_cache(cfg, progress=False)
    return root / "cache"


def test_item_holds_image_and_mask_channels_and_conditioning(cache):
    ds = SliceDataset(cache, "train")
    item = ds[0]
    assert item["x"].shape == (2, 16, 16) and item["x"].dtype == torch.float32
    assert item["token"].dtype == torch.long
    assert item["token"] == item["z_bin"] + item["pathology"] * N_BINS
    assert set(item["x"][1].unique().tolist()) <= {-1.0, 1.0}


def test_length_matches_the_index(cache):
    rows = list(csv.DictReader(open(cache / "val.csv")))
    assert len(SliceDataset(cache, "val")) == len(rows) == 12


def test_prior_is_the_head_mask_of_the_slice_bin_in_minus_one_to_one(cache):
    ds = SliceDataset(cache, "train", with_prior=True)
    head = np.load(cache / "priors.npz")["head_mask"]  # (n_bins, H, W) in [0, 1]
    item = ds[7]
    assert item["prior"].shape == (1, 16, 16)
    np.testing.assert_allclose(item["prior"][0].numpy(), head[int(item["z_bin"])] * 2 - 1)
    assert "prior" not in SliceDataset(cache, "train")[7]


def test_loader_with_worker_processes_reads_the_same_slices(cache):
    ds = SliceDataset(cache, "train")
    serial = torch.cat([b["x"] for b in DataLoader(ds, batch_size=8)])
    parallel = torch.cat([b["x"] for b in DataLoader(ds, batch_size=8, num_workers=2)])
    torch.testing.assert_close(serial, parallel)
    assert len(serial) == len(ds)


def test_lesion_sampler_draws_lesion_slices_as_often_as_asked(cache):
    ds = SliceDataset(cache, "train")
    lesion = float(ds.pathology.float().mean())
    assert 0 < lesion < 1
    draws = torch.tensor(list(lesion_sampler(ds, 4.0, seed=0, num_samples=20000)))
    expected = 4 * lesion / (4 * lesion + 1 - lesion)
    assert float(ds.pathology[draws].float().mean()) == pytest.approx(expected, abs=0.02)


def test_lesion_sampler_is_reproducible_with_a_seed(cache):
    ds = SliceDataset(cache, "train")
    assert list(lesion_sampler(ds, 3.0, seed=5)) == list(lesion_sampler(ds, 3.0, seed=5))


def test_lesion_sampler_rejects_a_non_positive_factor(cache):
    with pytest.raises(ValueError, match="oversample_lesions"):
        lesion_sampler(SliceDataset(cache, "train"), 0.0)


def _copy_with_meta(cache, tmp_path, edit):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(cache, target)
    meta = yaml.safe_load((target / "meta.yaml").read_text())
    edit(meta)
    (target / "meta.yaml").write_text(yaml.safe_dump(meta))
    return target


def test_meta_lacking_fields_is_a_clear_error(cache, tmp_path):
    target = _copy_with_meta(cache, tmp_path, lambda m: m.pop("geometry"))
    with pytest.raises(StaleCacheError, match=r"lacks field\(s\) \['geometry'\]"):
        SliceDataset(target, "train")


def test_cache_of_another_format_version_is_a_clear_error(cache, tmp_path):
    target = _copy_with_meta(cache, tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(StaleCacheError, match="format_version 99.*rebuild"):
        SliceDataset(target, "train")


def test_missing_cache_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no slice cache at"):
        SliceDataset(tmp_path / "nowhere", "train")


def test_unknown_split_is_an_error(cache):
    with pytest.raises(ValueError, match="split 'training' not in cache"):
        SliceDataset(cache, "training")
