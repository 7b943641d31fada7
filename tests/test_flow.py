"""Flow matching: the straight path, its velocity, training times and the ODE samplers."""

import math

import pytest
import torch

from ddpm.flow import (
    TIME_SCALE,
    flow_sample,
    interpolate,
    model_velocity,
    predict_noise,
    predict_x0,
    sample_times,
    velocity_target,
)


def _oracle(x0):
    """The exact velocity when the data is the single point x0.

    x_s = (1 - s) x0 + s n gives n = (x_s - (1 - s) x0) / s, so v = n - x0 = (x_s - x0) / s.
    """

    def fn(x, s):
        return (x - x0) / s.reshape(-1, *([1] * (x.ndim - 1)))

    return fn


def _data(shape=(2, 1, 4, 4, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) * 2 - 1


def test_interpolation_is_data_at_zero_and_noise_at_one():
    x0, noise = _data(seed=0), _data(seed=1)
    torch.testing.assert_close(interpolate(x0, noise, 0.0), x0, rtol=0, atol=0)
    torch.testing.assert_close(interpolate(x0, noise, 1.0), noise, rtol=0, atol=0)


def test_velocity_target_is_the_derivative_of_the_path_towards_the_noise():
    x0, noise = _data(seed=0), _data(seed=1)
    s, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    finite_difference = (interpolate(x0, noise, s + h) - interpolate(x0, noise, s - h)) / (2 * h)
    torch.testing.assert_close(velocity_target(x0, noise), finite_difference, rtol=0, atol=1e-8)


def test_per_sample_times_broadcast_over_the_batch():
    x0, noise = _data(seed=0), _data(seed=1)
    s = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = interpolate(x0, noise, s)
    for b in range(2):
        torch.testing.assert_close(out[b], (1 - s[b]) * x0[b] + s[b] * noise[b])


def test_x0_and_noise_are_recovered_from_the_true_velocity():
    x0, noise = _data(seed=0), _data(seed=1)
    s = torch.tensor([0.2, 0.9], dtype=torch.float64)
    x_s, v = interpolate(x0, noise, s), velocity_target(x0, noise)
    torch.testing.assert_close(predict_x0(x_s, s, v), x0)
    torch.testing.assert_close(predict_noise(x_s, s, v), noise)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_sampler_with_an_oracle_lands_on_x0_for_any_number_of_steps(method, steps):
    x0 = _data(seed=2)
    x1 = _data(seed=3)
    out = flow_sample(_oracle(x0), x1=x1, steps=steps, method=method, progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_with_an_oracle_lands_on_x0_in_float32_from_seeded_noise(method):
    x0 = _data(seed=2, dtype=torch.float32)
    out = flow_sample(_oracle(x0), x0.shape, steps=10, method=method,
                      generator=torch.Generator().manual_seed(0), progress=False)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def _linear_ode_error(method, steps, rate=2.0):
    """|x(0) - exact| for dx/ds = rate * x from x(1) = 1: exact x(0) = exp(-rate)."""
    x1 = torch.ones(1, 1, 1, dtype=torch.float64)
    out = flow_sample(lambda x, s: rate * x, x1=x1, steps=steps, method=method, progress=False)
    return abs(float(out) - math.exp(-rate))


def test_euler_is_first_order_and_heun_second_order_on_a_curved_flow():
    # Halving the step divides the error by about 2 (Euler) and 4 (Heun).
    euler_ratio = _linear_ode_error("euler", 32) / _linear_ode_error("euler", 64)
    heun_ratio = _linear_ode_error("heun", 32) / _linear_ode_error("heun", 64)
    assert 1.8 < euler_ratio < 2.2
    assert 3.6 < heun_ratio < 4.4
    assert _linear_ode_error("heun", 16) < _linear_ode_error("euler", 16) / 10


@pytest.mark.parametrize("method,evaluations", [("euler", 8), ("heun", 15)])
def test_sampler_evaluates_the_velocity_at_decreasing_times(method, evaluations):
    seen = []

    def fn(x, s):
        assert s.shape == (x.shape[0],)
        seen.append(float(s[0]))
        return torch.zeros_like(x)

    flow_sample(fn, (3, 1, 2, 2), steps=8, method=method, progress=False)
    assert len(seen) == evaluations
    assert seen[0] == 1.0 and all(0 < s <= 1 for s in seen)
    euler_points = seen if method == "euler" else seen[::2]
    assert euler_points == sorted(euler_points, reverse=True)


def test_sampling_is_deterministic_given_the_seed():
    def fn(x, s):
        return torch.sin(3 * x) * s.reshape(-1, 1, 1, 1)

    def run(seed):
        return flow_sample(fn, (2, 1, 4, 4), steps=5, method="heun",
                           generator=torch.Generator().manual_seed(seed), progress=False)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def test_sampler_rejects_an_unknown_method_and_a_missing_start():
    with pytest.raises(ValueError, match="midpoint"):
        flow_sample(lambda x, s: x, (1, 1, 2, 2), method="midpoint", progress=False)
    with pytest.raises(ValueError, match="shape or x1"):
        flow_sample(lambda x, s: x, progress=False)


def test_uniform_times_cover_the_unit_interval_and_repeat_with_the_seed():
    s = sample_times(20000, torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and s.min() >= 0 and s.max() < 1
    assert abs(float(s.mean()) - 0.5) < 0.01
    torch.testing.assert_close(s, sample_times(20000, torch.Generator().manual_seed(0)))


def test_logit_normal_times_concentrate_on_the_middle_of_the_path():
    g = torch.Generator().manual_seed(0)
    uniform, logit = sample_times(20000, g), sample_times(20000, g, "logit_normal")
    assert logit.min() > 0 and logit.max() < 1
    assert abs(float(logit.median()) - 0.5) < 0.01
    middle = ((logit > 0.25) & (logit < 0.75)).float().mean()
    assert middle > ((uniform > 0.25) & (uniform < 0.75)).float().mean() + 0.1
    with pytest.raises(ValueError, match="cosine"):
        sample_times(4, g, "cosine")


def test_model_velocity_feeds_the_network_scaled_times_and_the_condition_channels():
    calls = {}

    def model(x, t):
        calls["x"], calls["t"] = x, t
        return x[:, :1]

    state, anatomy = torch.zeros(2, 1, 4, 4), torch.ones(2, 3, 4, 4)
    out = model_velocity(model, anatomy)(state, torch.tensor([0.5, 0.25]))
    assert calls["x"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(calls["x"][:, 1:], anatomy)
    torch.testing.assert_close(calls["t"], torch.tensor([0.5, 0.25]) * TIME_SCALE)
    assert out.shape == state.shape
