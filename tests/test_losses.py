"""The JS-DDPM loss: per-channel normalisation, lesion, uncertainty and min-SNR weighting."""

import pytest
import torch
import torch.nn.functional as F

from ddpm.losses import DiffusionLoss, gradient_loss, min_snr_weight, regression_loss


def _pair_with_unequal_channel_errors():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 2, 8, 8, generator=g)
    pred = target.clone()
    pred[:, 0] += 2.0  # image channel: error 2 everywhere
    pred[:, 1, :2, :2] += 3.0  # mask channel: large error on 4 of 64 pixels
    return pred, target


def test_each_channel_is_normalised_by_its_own_element_count():
    pred, target = _pair_with_unequal_channel_errors()
    loss = DiffusionLoss()
    per_channel = loss.per_channel(pred, target)
    torch.testing.assert_close(per_channel[0], F.mse_loss(pred[:, 0], target[:, 0]))
    torch.testing.assert_close(per_channel[1], F.mse_loss(pred[:, 1], target[:, 1]))


def test_stacked_mse_differs_from_the_weighted_per_channel_loss():
    pred, target = _pair_with_unequal_channel_errors()
    loss = DiffusionLoss(channel_weights=(1.0, 3.0))
    total, parts = loss(pred, target)
    stacked = F.mse_loss(pred, target)
    expected = parts["loss_image"] + 3.0 * parts["loss_mask"]
    torch.testing.assert_close(total, expected)
    assert not torch.isclose(total, stacked)


def test_lesion_weighting_counts_lesion_pixels_w_times_without_changing_the_scale():
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.ones(1, 1, 4, 4)  # the same error everywhere
    lesion = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    lesion[..., 0, 0] = True
    loss = DiffusionLoss(channel_names=("image",), channel_weights=(1.0,), lesion_weight=5.0)
    # uniform error: weighting must not change the loss value (normalised by the weights)
    torch.testing.assert_close(loss.per_channel(pred, target, lesion)[0], torch.tensor(1.0))
    pred2 = torch.zeros(1, 1, 4, 4)
    pred2[..., 0, 0] = 1.0  # error only inside the lesion
    got = loss.per_channel(pred2, target, lesion)[0]
    torch.testing.assert_close(got, torch.tensor(5.0 / (15 + 5.0)))


def test_uncertainty_weighting_learns_log_variances_that_appear_in_parts():
    pred, target = _pair_with_unequal_channel_errors()
    loss = DiffusionLoss(uncertainty_weighting=True)
    total, parts = loss(pred, target)
    assert "logvar_image" in parts and "logvar_mask" in parts
    # s = 0: total = 0.5 * (L_image + L_mask)
    torch.testing.assert_close(total, 0.5 * (parts["loss_image"] + parts["loss_mask"]))
    total.backward()
    assert loss.log_variances.grad is not None and loss.log_variances.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_follow_hang_et_al(prediction):
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    w = min_snr_weight(snr, 5.0, prediction)
    clipped = snr.clamp(max=5.0)
    expected = {"eps": torch.tensor([1.0, 1.0, 1.0, 0.1]), "x0": clipped, "v": clipped / (snr + 1)}
    torch.testing.assert_close(w, expected[prediction])


def test_min_snr_weighting_changes_per_sample_contributions():
    pred, target = _pair_with_unequal_channel_errors()
    plain = DiffusionLoss()(pred, target)[0]
    snr = torch.tensor([100.0, 100.0, 100.0, 100.0])
    weighted = DiffusionLoss(min_snr_gamma=5.0)(pred, target, snr=snr)[0]
    torch.testing.assert_close(weighted, plain * 0.05)


def test_gradient_loss_is_zero_for_an_offset_and_positive_for_a_blur():
    x = torch.rand(1, 1, 6, 6, 6)
    assert gradient_loss(x + 3.0, x).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_loss(torch.zeros_like(x), x).item() > 0


def test_regression_loss_adds_the_gradient_term():
    pred, target = torch.zeros(1, 1, 5, 5), torch.rand(1, 1, 5, 5)
    plain, _ = regression_loss(pred, target, "l1")
    with_grad, parts = regression_loss(pred, target, "l1", gradient_weight=0.5)
    torch.testing.assert_close(with_grad, plain + 0.5 * parts["loss_gradient"])
    with pytest.raises(ValueError, match="l1"):
        regression_loss(pred, target, "huber")
