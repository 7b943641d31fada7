"""Specification of ddpm.metrics: PSNR and SSIM as scikit-image computes them, Dice, MAE."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ddpm.metrics import dice, mae, psnr, ssim

TOL = 1e-6  # both sides compute in float64, so agreement is far tighter than 1e-4


def skimage_ssim(a, b, data_range):
    """The SSIM paper's settings in scikit-image (population covariance, 11-tap Gaussian)."""
    return structural_similarity(
        np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range,
    )


def structured_image(shape, seed=0):
    """A smooth gradient with a bright disk / ball and a dark box, values in about [0, 1]."""
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    image = 0.4 * sum(grids) / len(grids)
    centre_dist = sum((g - 0.6) ** 2 for g in grids)
    image[centre_dist < 0.05] = 0.9
    box = tuple(slice(n // 8, n // 3) for n in shape)
    image[box] = 0.05
    return image


def degraded(image, seed=0):
    """The image blurred and with Gaussian noise: a realistic imperfect reconstruction."""
    rng = np.random.default_rng(seed)
    return gaussian_filter(image, 1.0) + 0.05 * rng.standard_normal(image.shape)


@pytest.mark.parametrize("shape", [(64, 48), (20, 24, 28)], ids=["2d", "3d"])
def test_ssim_matches_scikit_image_on_structured_images(shape):
    target = structured_image(shape)
    pred = degraded(target)
    expected = skimage_ssim(pred, target, data_range=1.0)
    assert ssim(torch.from_numpy(pred), torch.from_numpy(target), 1.0).item() == pytest.approx(
        expected, abs=TOL
    )


@pytest.mark.parametrize("shape", [(40, 50), (16, 18, 20)], ids=["2d", "3d"])
def test_ssim_matches_scikit_image_on_random_images(shape):
    rng = np.random.default_rng(1)
    target = rng.uniform(-1, 1, shape)
    pred = target + 0.3 * rng.standard_normal(shape)
    expected = skimage_ssim(pred, target, data_range=2.0)
    assert ssim(torch.from_numpy(pred), torch.from_numpy(target), 2.0).item() == pytest.approx(
        expected, abs=TOL
    )


def test_ssim_uses_the_given_data_range():
    target = structured_image((32, 32))
    pred = degraded(target)
    for data_range in (0.5, 4.0):
        expected = skimage_ssim(pred, target, data_range=data_range)
        assert ssim(torch.from_numpy(pred), torch.from_numpy(target), data_range).item() == (
            pytest.approx(expected, abs=TOL)
        )


def test_ssim_of_identical_images_is_one():
    image = torch.from_numpy(structured_image((32, 32)))
    assert ssim(image, image, 1.0).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(64, 48), (12, 14, 16)], ids=["2d", "3d"])
def test_psnr_matches_scikit_image(shape):
    target = structured_image(shape)
    pred = degraded(target)
    expected = peak_signal_noise_ratio(target, pred, data_range=1.0)
    assert psnr(torch.from_numpy(pred), torch.from_numpy(target), 1.0).item() == pytest.approx(
        expected, abs=TOL
    )


def test_psnr_of_identical_images_is_infinite():
    image = torch.rand(16, 16)
    assert psnr(image, image, 1.0).item() == float("inf")


def test_batched_2d_ssim_is_the_channel_mean_of_per_image_ssim():
    rng = np.random.default_rng(2)
    target = torch.from_numpy(rng.uniform(0, 1, (3, 2, 24, 20)))
    pred = target + 0.2 * torch.from_numpy(rng.standard_normal((3, 2, 24, 20)))
    batched = ssim(pred, target, 1.0)
    assert batched.shape == (3,)
    for b in range(3):
        per_channel = [ssim(pred[b, c], target[b, c], 1.0) for c in range(2)]
        assert batched[b].item() == pytest.approx(torch.stack(per_channel).mean().item(), abs=1e-12)


def test_batched_3d_ssim_equals_per_volume_ssim():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.uniform(0, 1, (2, 1, 12, 13, 14)))
    pred = target + 0.2 * torch.from_numpy(rng.standard_normal((2, 1, 12, 13, 14)))
    batched = ssim(pred, target, 1.0)
    assert batched.shape == (2,)
    for b in range(2):
        assert batched[b].item() == pytest.approx(ssim(pred[b, 0], target[b, 0], 1.0).item(),
                                                  abs=1e-12)


def test_batched_psnr_and_mae_equal_per_element_values():
    rng = np.random.default_rng(4)
    target = torch.from_numpy(rng.uniform(0, 1, (4, 2, 8, 8)))
    pred = target + 0.1 * torch.from_numpy(rng.standard_normal((4, 2, 8, 8)))
    batched_psnr, batched_mae = psnr(pred, target, 1.0), mae(pred, target)
    assert batched_psnr.shape == batched_mae.shape == (4,)
    for b in range(4):
        expected = peak_signal_noise_ratio(target[b].numpy(), pred[b].numpy(), data_range=1.0)
        assert batched_psnr[b].item() == pytest.approx(expected, abs=TOL)
        assert batched_mae[b].item() == pytest.approx((pred[b] - target[b]).abs().mean().item())


def test_single_image_gives_a_scalar():
    image = torch.rand(16, 16)
    assert ssim(image, image * 0.9, 1.0).shape == ()
    assert psnr(image, image * 0.9, 1.0).shape == ()


def test_bf16_input_is_computed_without_bf16_rounding_of_the_result():
    target = torch.from_numpy(structured_image((32, 32))).to(torch.bfloat16)
    pred = torch.from_numpy(degraded(structured_image((32, 32)))).to(torch.bfloat16)
    # The reference sees exactly the bf16 values, upcast; any bf16 arithmetic inside ssim
    # would put it off by ~1e-3.
    expected = skimage_ssim(pred.double().numpy(), target.double().numpy(), data_range=1.0)
    result = ssim(pred, target, 1.0)
    assert result.dtype == torch.float64
    assert result.item() == pytest.approx(expected, abs=TOL)
    expected_psnr = peak_signal_noise_ratio(target.double().numpy(), pred.double().numpy(),
                                            data_range=1.0)
    assert psnr(pred, target, 1.0).item() == pytest.approx(expected_psnr, abs=TOL)


def test_data_range_is_required():
    image = torch.rand(16, 16)
    with pytest.raises(TypeError):
        ssim(image, image)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        psnr(image, image)  # type: ignore[call-arg]


@pytest.mark.parametrize("bad_range", [0.0, -1.0, float("nan")])
def test_non_positive_data_range_is_an_error(bad_range):
    image = torch.rand(16, 16)
    with pytest.raises(ValueError, match="data_range"):
        ssim(image, image, bad_range)
    with pytest.raises(ValueError, match="data_range"):
        psnr(image, image, bad_range)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.rand(16, 16), torch.rand(16, 17), 1.0)
    with pytest.raises(ValueError, match="shape"):
        dice(torch.rand(4, 4) > 0.5, torch.rand(4, 5) > 0.5)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="11"):
        ssim(torch.rand(10, 32), torch.rand(10, 32), 1.0)


def test_dice_of_two_empty_masks_is_one():
    empty = torch.zeros(8, 8, dtype=torch.bool)
    assert dice(empty, empty).item() == 1.0


def test_dice_of_disjoint_masks_is_zero():
    a = torch.zeros(8, 8, dtype=torch.bool)
    b = torch.zeros(8, 8, dtype=torch.bool)
    a[:4], b[4:] = True, True
    assert dice(a, b).item() == 0.0


def test_dice_of_partial_overlap_is_twice_intersection_over_total():
    a = torch.zeros(10, dtype=torch.bool)
    b = torch.zeros(10, dtype=torch.bool)
    a[0:4] = True  # 4 voxels
    b[1:7] = True  # 6 voxels, 3 of them shared with a
    a, b = a.view(2, 5), b.view(2, 5)
    assert dice(a, b).item() == pytest.approx(2 * 3 / (4 + 6))


def test_dice_binarises_float_masks_at_the_threshold():
    a = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice(a, b).item() == pytest.approx(dice(a > 0.5, b > 0.5).item())
    # Masks generated in [-1, 1]: binarise at 0.
    assert dice(2 * a - 1, 2 * b - 1, threshold=0.0).item() == pytest.approx(0.5)


def test_dice_is_per_batch_element():
    pred = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    target = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    pred[0, 0, :2] = True
    target[0, 0, :2] = True  # element 0: identical -> 1
    pred[1, 0, :2] = True  # element 1: target empty -> 0
    assert dice(pred, target).tolist() == [1.0, 0.0]


def test_mae_of_a_constant_offset_is_the_offset():
    image = torch.rand(8, 8)
    assert mae(image + 0.25, image).item() == pytest.approx(0.25)
