"""Sliding-window inference: placement, coverage, weights, and agreement with whole-volume runs."""

import pytest
import torch
from torch import nn

from ddpm.inference import (
    SlidingWindow,
    axis_starts,
    gaussian_weights,
    sliding_window,
    window_positions,
    windowed,
)


def _volume(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pointwise(dims, seed=0):
    """A 1x1(x1) model: each output voxel depends on its own input voxel only."""
    torch.manual_seed(seed)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(conv(2, 8, 1), nn.ReLU(), conv(8, 3, 1)).eval()


def _conv_net(dims, seed=0):
    """Three 3x3(x3) zero-padded convolutions: a receptive field of 7 voxels per axis."""
    torch.manual_seed(seed)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(conv(2, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1),
                         nn.ReLU(), conv(8, 1, 3, padding=1)).eval()


def test_windows_cover_the_axis_with_the_last_one_flush_with_the_border():
    for size, window in [(24, 16), (48, 32), (100, 32), (33, 32), (32, 32)]:
        starts = axis_starts(size, window, 0.5)
        assert starts[0] == 0 and starts[-1] == size - window
        assert all(b - a <= window // 2 for a, b in zip(starts, starts[1:]))  # >= 50% overlap


def test_no_overlap_tiles_an_exact_multiple_without_repeats():
    assert axis_starts(64, 16, 0.0) == [0, 16, 32, 48]


def test_every_voxel_is_covered_by_some_window():
    spatial, window = (37, 24, 50), (16, 16, 16)
    covered = torch.zeros(spatial, dtype=torch.int32)
    for start in window_positions(spatial, window, overlap=0.25):
        covered[tuple(slice(a, a + w) for a, w in zip(start, window))] += 1
    assert covered.min() >= 1


def test_gaussian_weights_peak_at_the_centre_and_stay_positive_at_the_corners():
    weights = gaussian_weights((16, 16, 16), 0.125)
    assert weights.shape == (16, 16, 16)
    assert float(weights.max()) == pytest.approx(1.0, abs=1e-3)
    assert float(weights[7, 7, 7]) > 0.99 and float(weights[0, 0, 0]) > 0
    assert float(weights[0, 8, 8]) < 0.01  # the border is damped by two orders of magnitude


@pytest.mark.parametrize("dims", [2, 3])
def test_pointwise_model_matches_the_whole_volume_to_float_rounding(dims):
    model = _pointwise(dims)
    window = (16,) * dims
    x = _volume((2, 2) + (24,) * dims)  # 1.5 x the window
    with torch.no_grad():
        whole, tiled = model(x), sliding_window(model, x, window)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_net_matches_the_whole_volume_within_two_percent_of_its_range(dims):
    # Inside a window, voxels within 3 voxels of the window border see zero padding instead
    # of their neighbours. Where windows overlap such voxels are nearer the centre of the
    # other window, whose Gaussian weight is 20-1000x larger, so the blended error is small.
    # Measured max error / output range: 6.9e-3 (2D), 5.8e-3 (3D); a flat average gives
    # 0.21-0.23 (next test). Bound: 2e-2.
    model = _conv_net(dims)
    x = _volume((1, 2) + (24,) * dims)
    with torch.no_grad():
        whole, tiled = model(x), sliding_window(model, x, (16,) * dims)
    error = float((tiled - whole).abs().max() / (whole.max() - whole.min()))
    assert error < 2e-2


def test_gaussian_weighting_has_smaller_seams_than_a_flat_average():
    model = _conv_net(3)
    x = _volume((1, 2, 24, 24, 24))
    with torch.no_grad():
        whole = model(x)
        gaussian = sliding_window(model, x, (16, 16, 16), sigma_scale=0.125)
        flat = sliding_window(model, x, (16, 16, 16), sigma_scale=1e3)
    gaussian_error = float((gaussian - whole).abs().max())
    flat_error = float((flat - whole).abs().max())
    assert gaussian_error < flat_error / 5


@pytest.mark.parametrize("dims", [2, 3])
def test_input_smaller_than_the_window_is_padded_and_cropped_back(dims):
    model = _pointwise(dims)
    x = _volume((2, 2) + (10, 13, 7)[:dims])
    seen = []

    def fn(windows):
        seen.append(tuple(windows.shape[2:]))
        return model(windows)

    with torch.no_grad():
        out = sliding_window(fn, x, (16,) * dims)
    assert seen == [(16,) * dims]
    assert out.shape == (2, 3) + x.shape[2:]
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-6)


def test_padding_uses_one_value_per_channel_when_given():
    x = torch.zeros(1, 2, 4, 4)
    seen = {}

    def fn(windows):
        seen["w"] = windows
        return windows

    sliding_window(fn, x, (8, 8), pad_value=[-1.0, 3.0])
    assert float(seen["w"][0, 0, 0, 0]) == -1.0 and float(seen["w"][0, 1, 0, 0]) == 3.0
    assert float(seen["w"][0, 0, 3, 3]) == 0.0  # the data itself sits in the middle


def test_per_volume_arguments_follow_their_volume_in_batched_windows():
    # fn adds the volume's own offset; with 4 positions per call every window must still
    # receive the offset of the volume it was cut from.
    x = torch.zeros(3, 1, 24, 24)
    offsets = torch.tensor([1.0, 2.0, 3.0])

    def fn(windows, t):
        return windows + t.reshape(-1, 1, 1, 1)

    out = SlidingWindow((16, 16), batch_size=4)(fn, x, batch_args=(offsets,))
    for b in range(3):
        torch.testing.assert_close(out[b], torch.full((1, 24, 24), float(offsets[b])))


def test_windowed_denoiser_matches_the_whole_volume_call_with_conditioning_channels():
    model = _pointwise(3)  # 2 input channels: the noisy state and one anatomy channel

    def denoiser_window(w, t):
        return model(w)[:, :1] * t.reshape(-1, 1, 1, 1, 1)

    state, anatomy = _volume((2, 1, 12, 12, 12), seed=1), _volume((2, 1, 12, 12, 12), seed=2)
    t = torch.tensor([3.0, 5.0])
    denoiser = windowed(SlidingWindow((8, 8, 8), batch_size=3), denoiser_window, anatomy)
    with torch.no_grad():
        expected = denoiser_window(torch.cat([state, anatomy], dim=1), t)
        torch.testing.assert_close(denoiser(state, t), expected, rtol=1e-5, atol=1e-5)


def test_batched_positions_give_the_same_result_as_one_at_a_time():
    model = _conv_net(2)
    x = _volume((2, 2, 40, 24))
    with torch.no_grad():
        one = sliding_window(model, x, (16, 16), batch_size=1)
        many = sliding_window(model, x, (16, 16), batch_size=5)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_an_evaluator_reused_across_calls_and_shapes_stays_correct():
    model = _pointwise(3)
    evaluator = SlidingWindow((8, 8, 8))
    with torch.no_grad():
        for shape in [(12, 12, 12), (8, 20, 9), (12, 12, 12)]:
            x = _volume((1, 2) + shape, seed=sum(shape))
            torch.testing.assert_close(evaluator(model, x), model(x), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow((8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="spatial axes"):
        SlidingWindow((8, 8))(lambda w: w, torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="fn returned shape"):
        sliding_window(lambda w: w[..., :4], torch.zeros(1, 1, 8, 8), (8, 8))
