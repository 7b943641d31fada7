"""Sampling from a checkpoint: conditions, post-processing, sample.py's files, determinism."""

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy.ndimage import binary_fill_holes

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.generation import (
    background_masks,
    bin_centre_z,
    condition_list,
    expand_conditions,
    generate,
    load_trained,
    parse_pathology,
    parse_z_bins,
    postprocess,
    slice_affine,
)
from ddpm.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tiny_trained_checkpoint(tmp_path_factory, tiny_root) -> Path:
    """A checkpoint of the tiny config trained for 36 steps, built once per test session.

    36 steps at lr 2e-3 is enough for the live weights to reconstruct several dB better than
    their initialisation at t >= 250; the EMA (decay 0.9, warm-up) follows them closely.
    """
    run_dir = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    path = run_dir / "quickstart" / "checkpoints" / "last.pt"
    if not path.is_file():
        cfg = tiny_config(tiny_root, train={"run_dir": str(run_dir), "epochs": 6,
                                            "val_every": 1000, "sample_every": 1000},
                          ema={"decay": 0.9}, optim={"lr": 2e-3})
        train(cfg, progress=False)
    return path


def load_script(name: str):
    """``main`` of a script at the repository root, imported without running it."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_root):
    return tiny_trained_checkpoint(tmp_path_factory, tiny_root)


@pytest.fixture(scope="module")
def sample_main():
    return load_script("sample")


def run_sample(sample_main, checkpoint, out, *extra):
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--z-bins", "0,3",
            "--pathology", "both", "-n", "2", "--steps", "3", "--no-progress", *extra]
    assert sample_main(argv) == 0
    return np.load(out / "samples.npz")


# --- conditions --------------------------------------------------------------------------------


def test_z_bins_accept_a_list_a_range_a_mix_and_all():
    assert parse_z_bins("0,3,5", 10) == [0, 3, 5]
    assert parse_z_bins("2-5", 10) == [2, 3, 4, 5]
    assert parse_z_bins("0,4-6", 10) == [0, 4, 5, 6]
    assert parse_z_bins("all", 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("text", ["10", "3-12", "a", "5-2"])
def test_z_bins_outside_the_checkpoints_bins_or_malformed_are_refused(text):
    with pytest.raises(ValueError, match="--z-bins"):
        parse_z_bins(text, 10)


def test_pathology_both_means_healthy_then_lesion():
    assert parse_pathology("both") == [0, 1]
    assert parse_pathology("1") == [1]
    with pytest.raises(ValueError, match="--pathology"):
        parse_pathology("2")


def test_conditions_are_bin_major_with_n_samples_each_in_a_row():
    z, p = expand_conditions(condition_list([2, 5], [0, 1]), 3)
    assert z.tolist() == [2] * 6 + [5] * 6
    assert p.tolist() == [0, 0, 0, 1, 1, 1] * 2


# --- post-processing ---------------------------------------------------------------------------


def _priors():
    head = torch.zeros(2, 8, 8)
    head[0, 2:6, 2:6] = 0.9  # bin 0: head in the centre
    head[1, :, :4] = 0.6  # bin 1: head on the left half
    head[1, :, 3] = 0.4  # ... except one column under the 0.5 threshold
    return {"head_mask": head, "image": torch.zeros(2, 8, 8)}


def test_blanking_sets_both_channels_to_minus_one_outside_the_bins_head_mask():
    x = torch.full((2, 2, 8, 8), 0.3)
    out = postprocess(x, torch.tensor([0, 1]), _priors(), binarise_mask=False)
    head = _priors()["head_mask"] >= 0.5
    for i in range(2):
        for c in range(2):
            assert torch.all(out[i, c][~head[i]] == -1.0)
            assert torch.all(out[i, c][head[i]] == 0.3)


def test_blanking_keeps_dark_holes_enclosed_by_the_head():
    head = torch.zeros(1, 9, 9)
    head[0, 1:8, 1:8] = 0.9
    head[0, 3:6, 3:6] = 0.2  # ventricles: dark, so below the threshold, but inside the head
    out = postprocess(torch.full((1, 2, 9, 9), 0.3), torch.tensor([0]),
                      {"head_mask": head}, binarise_mask=False)
    assert torch.all(out[0, :, 3:6, 3:6] == 0.3)
    assert torch.all(out[0, :, 0] == -1.0) and torch.all(out[0, :, :, 8] == -1.0)


def test_background_is_what_hole_filling_leaves_outside_the_head():
    g = torch.Generator().manual_seed(0)
    head = (torch.rand(10, 12, 12, generator=g) > 0.45).float()  # ragged masks with holes
    ours = background_masks({"head_mask": head}, torch.arange(10))[:, 0].numpy()
    for i in range(10):
        assert np.array_equal(ours[i], ~binary_fill_holes(head[i].numpy() >= 0.5))


def test_binarising_thresholds_the_mask_channel_at_zero_and_leaves_the_image():
    x = torch.tensor([-0.5, -0.01, 0.0, 0.01, 0.7]).reshape(1, 1, 1, 5).repeat(1, 2, 1, 1)
    out = postprocess(x, torch.tensor([0]), {"head_mask": torch.ones(1, 1, 5)},
                      blank_background=False)
    assert out[0, 1, 0].tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    assert torch.equal(out[:, 0], x[:, 0])


def test_postprocessing_switched_off_returns_the_samples_unchanged():
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    out = postprocess(x, torch.tensor([0, 1]), _priors(), blank_background=False,
                      binarise_mask=False)
    assert torch.equal(out, x) and out is not x


# --- geometry ----------------------------------------------------------------------------------


def test_bin_centre_is_the_mean_slice_index_of_the_bin():
    # z 10..19 in 4 bins: sizes 3, 2, 3, 2 (bin = (z - 10) * 4 // 10)
    assert [bin_centre_z(b, (10, 19), 4) for b in range(4)] == [11.0, 13.5, 16.0, 18.5]


def test_slice_affine_moves_the_cache_grid_to_the_bin_centre():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    meta = {"geometry": {"affine": affine.tolist()}, "z_range": [10, 19], "n_bins": 4}
    moved = slice_affine(meta, 1)
    assert np.allclose(moved[:, :2], affine[:, :2]) and np.allclose(moved[:3, 2], [0, 0, 3])
    assert np.allclose(moved @ [0, 0, 0, 1], affine @ [0, 0, 13.5, 1])


# --- sample.py ---------------------------------------------------------------------------------


def test_sample_script_writes_a_grid_an_npz_and_niftis_with_the_cache_geometry(
        sample_main, checkpoint, tmp_path):
    data = run_sample(sample_main, checkpoint, tmp_path)
    meta = load_checkpoint(checkpoint)["cache_meta"]
    size = meta["image_size"]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert data["samples"].shape == (8, 2, size, size)
    assert data["z_bins"].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert data["pathology"].tolist() == [0, 0, 1, 1] * 2
    assert np.array_equal(data["tokens"], data["z_bins"] + data["pathology"] * meta["n_bins"])
    assert int(data["seed"]) == 0
    for b in (0, 3):
        for kind in ("healthy", "lesion"):
            image = nib.load(tmp_path / f"bin{b:02d}_{kind}_image.nii.gz")
            mask = nib.load(tmp_path / f"bin{b:02d}_{kind}_mask.nii.gz")
            assert image.shape == mask.shape == (size, size, 1, 2)
            assert np.allclose(image.affine, slice_affine(meta, b))
            assert np.allclose(mask.affine, image.affine)
            assert mask.get_data_dtype() == np.uint8  # binarised by default
    # the NIfTI voxels are the npz samples: (H, W, 1, n) <- (n, C, H, W)
    image = nib.load(tmp_path / "bin03_lesion_image.nii.gz").get_fdata()
    assert np.allclose(image[:, :, 0, 1], data["samples"][7, 0], atol=1e-6)


def test_default_samples_are_blanked_outside_the_head_and_have_a_binary_mask(
        sample_main, checkpoint, tmp_path):
    data = run_sample(sample_main, checkpoint, tmp_path)
    priors = load_checkpoint(checkpoint)["priors"]
    for sample, b in zip(data["samples"], data["z_bins"]):
        head = binary_fill_holes(priors["head_mask"][b].numpy() >= 0.5)  # holes are head
        assert np.all(sample[:, ~head] == -1)
    assert set(np.unique(data["samples"][:, 1]).tolist()) <= {-1.0, 1.0}


def test_post_processing_can_be_switched_off(sample_main, checkpoint, tmp_path):
    raw = run_sample(sample_main, checkpoint, tmp_path, "--no-blank-background",
                     "--no-binarise-mask")
    assert not set(np.unique(raw["samples"][:, 1]).tolist()) <= {-1.0, 1.0}
    mask = nib.load(tmp_path / "bin00_healthy_mask.nii.gz")
    assert mask.get_data_dtype() == np.float32


def test_same_seed_gives_the_same_samples_and_another_seed_others(
        sample_main, checkpoint, tmp_path):
    a = run_sample(sample_main, checkpoint, tmp_path / "a", "--seed", "7")
    b = run_sample(sample_main, checkpoint, tmp_path / "b", "--seed", "7")
    c = run_sample(sample_main, checkpoint, tmp_path / "c", "--seed", "8")
    assert np.array_equal(a["samples"], b["samples"])
    assert not np.array_equal(a["samples"], c["samples"])


def test_ddim_samples_do_not_depend_on_the_batch_size(checkpoint):
    """Chunking changes only float32 rounding: oneDNN picks its convolution kernels by batch
    size. At the first of 3 DDIM steps, t = 999, alpha_bar is 2.4e-9 under the cosine
    schedule, so x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies a rounding
    difference in eps by ~2e4 before x0 is clipped to [-1, 1]; measured differences are
    2e-4 to 7e-4. A batching mistake (the wrong noise slot or condition for a sample) changes
    samples by O(1), which the check with another seed shows the tolerance would catch."""
    tm = load_trained(checkpoint, device="cpu")
    z, p = expand_conditions(condition_list([0, 1, 2], [0, 1]), 1)
    whole = generate(tm, z, p, steps=3, eta=0.0, seed=3, batch_size=64, progress=False)
    chunked = generate(tm, z, p, steps=3, eta=0.0, seed=3, batch_size=4, progress=False)
    other_noise = generate(tm, z, p, steps=3, eta=0.0, seed=4, batch_size=4, progress=False)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=5e-3)
    assert (other_noise - whole).abs().max() > 0.1


def test_live_and_ema_weights_give_different_samples(sample_main, checkpoint, tmp_path):
    ema = run_sample(sample_main, checkpoint, tmp_path / "ema")
    live = run_sample(sample_main, checkpoint, tmp_path / "live", "--no-ema",
                      "--no-blank-background", "--no-binarise-mask")
    ema_raw = run_sample(sample_main, checkpoint, tmp_path / "ema_raw",
                         "--no-blank-background", "--no-binarise-mask")
    assert str(ema["weights"]) == "ema" and str(live["weights"]) == "live"
    assert not np.allclose(live["samples"], ema_raw["samples"])


def test_sampling_needs_no_cache_and_ignores_the_config_s_data_settings(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["config"]["data"]["cache_dir"] = str(tmp_path / "no_cache_here")
    state["config"]["data"]["image_size"] = 32  # geometry must come from cache_meta
    moved = save_checkpoint(state, tmp_path / "moved.pt")
    tm = load_trained(moved, device="cpu")
    x = generate(tm, torch.tensor([0]), torch.tensor([1]), steps=2, progress=False)
    size = state["cache_meta"]["image_size"]
    assert x.shape == (1, 2, size, size)


def test_a_checkpoint_of_another_objective_is_refused_by_name(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["config"]["model"]["objective"] = "flow"
    flow = save_checkpoint(state, tmp_path / "flow.pt")
    with pytest.raises(ValueError, match="objective") as err:
        load_trained(flow, device="cpu")
    assert "flow.pt" in str(err.value)


def test_guidance_is_refused_for_a_model_trained_without_condition_dropout(checkpoint):
    tm = load_trained(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        generate(tm, torch.tensor([0]), torch.tensor([0]), guidance=2.0, progress=False)


def test_a_file_that_is_not_a_checkpoint_is_an_error_not_a_traceback(sample_main, tmp_path,
                                                                      capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert sample_main(["--checkpoint", str(bogus), "--out", str(tmp_path / "o")]) == 2
    assert "bogus.pt" in capsys.readouterr().err
