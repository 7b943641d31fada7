"""Noise schedules: shapes, monotonicity, and the identities between eps, x0 and v."""

import pytest
import torch

from ddpm.schedule import PREDICTIONS, SCHEDULES, NoiseSchedule

FLOAT32_EPS = torch.finfo(torch.float32).eps
ALL_SCHEDULES = [(kind, ztsnr) for kind in SCHEDULES for ztsnr in (False, True)]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_buffers_are_float32_with_one_value_per_timestep(kind):
    s = NoiseSchedule(kind, 1000)
    assert s.betas.dtype == torch.float32 and s.betas.shape == (1000,)
    assert s.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_alphas_cumprod_decreases_from_near_one(kind):
    abar = NoiseSchedule(kind, 1000).alphas_cumprod
    assert abar[0] > 0.99
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[-1] < 0.01


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)


def test_cosine_schedule_matches_nichol_dhariwal_formula_and_cap():
    s = NoiseSchedule("cosine", 1000)
    t = torch.tensor([0, 250, 500, 750], dtype=torch.float64)
    f = lambda u: torch.cos((u / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
    expected = f(t + 1) / f(torch.zeros(()))
    torch.testing.assert_close(s.alphas_cumprod[t.long()].double(), expected, rtol=1e-5, atol=1e-7)
    assert s.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_zero_terminal_snr_ends_at_zero_and_keeps_the_first_step(kind):
    plain, rescaled = NoiseSchedule(kind, 1000), NoiseSchedule(kind, 1000, zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(
        plain.alphas_cumprod[0].item(), rel=1e-6
    )
    assert rescaled.snr(999).item() == 0.0


def _conversion_tolerance(s, t, prediction):
    """A few float32 ulps of a unit-scale x_t, amplified by the conversion's coefficients."""
    a, b = s.sqrt_alphas_cumprod[t].double(), s.sqrt_one_minus_alphas_cumprod[t].double()
    gain = {"eps": 1 / a, "x0": b / a + 1 / a, "v": a + b}[prediction]
    return (8 * FLOAT32_EPS * gain).float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind,ztsnr", ALL_SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_is_recovered_from_q_sample_with_the_true_noise(kind, ztsnr, prediction):
    s = NoiseSchedule(kind, 1000, zero_terminal_snr=ztsnr)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(0, 1000, 7)
    if ztsnr and prediction == "eps":
        t = t[s.alphas_cumprod[t] > 0]  # eps cannot determine x0 where abar = 0 (pure noise)
    x0 = torch.rand(len(t), 2, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    x_t = s.q_sample(x0, t, eps)
    target = s.training_target(x0, t, eps, prediction)
    x0_hat, eps_hat = s.x0_and_eps(x_t, t, target, prediction)
    err = (x0_hat - x0).abs().amax(dim=(1, 2, 3), keepdim=True)
    assert torch.all(err <= _conversion_tolerance(s, t, prediction)), err.max()
    if prediction != "eps":
        # eps from x0 divides by sqrt(1 - abar), tiny at t = 0; check where it is well posed
        ok = s.sqrt_one_minus_alphas_cumprod[t] > 0.1
        torch.testing.assert_close(eps_hat[ok], eps[ok], rtol=0, atol=1e-4)


def test_velocity_identities_hold_exactly_in_float64_arithmetic():
    s = NoiseSchedule("cosine", 1000)
    x0, eps = (
        torch.randn(4, 1, 4, 4, dtype=torch.float64),
        torch.randn(4, 1, 4, 4, dtype=torch.float64),
    )
    t = torch.tensor([0, 10, 500, 990])
    x_t = s.q_sample(x0, t, eps)
    v = s.velocity(x0, t, eps)
    torch.testing.assert_close(s.x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(s.eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_posterior_variance_is_nonnegative_and_zero_only_at_t0(kind):
    var = NoiseSchedule(kind, 1000).posterior_variance
    assert var[0].item() == 0.0
    assert torch.all(var[1:] > 0)


def test_posterior_matches_bayes_rule_closed_form():
    s = NoiseSchedule("linear", 100)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([1, 40, 99])
    mean, var = s.posterior(x0, x_t, t)
    betas, abar = s.betas.double(), s.alphas_cumprod.double()
    for i, ti in enumerate(t.tolist()):
        b, ab_prev = betas[ti], abar[ti - 1]
        # product of Gaussians: q(x_t | x_{t-1}) q(x_{t-1} | x0), solved for x_{t-1}
        precision = (1 - b) / b + 1 / (1 - ab_prev)
        expected_mean = (
            (1 - b).sqrt() / b * x_t[i].double() + ab_prev.sqrt() / (1 - ab_prev) * x0[i].double()
        ) / precision
        torch.testing.assert_close(mean[i].double(), expected_mean, rtol=1e-4, atol=1e-5)
        assert var[i].item() == pytest.approx(float(1 / precision), rel=1e-4)


def test_reverse_variance_large_is_beta():
    s = NoiseSchedule("cosine", 1000)
    x = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([3, 700])
    torch.testing.assert_close(s.reverse_variance(t, x, "large").flatten(), s.betas[t])


def test_snr_is_abar_over_one_minus_abar():
    s = NoiseSchedule("sigmoid", 1000)
    abar = s.alphas_cumprod[500]
    assert s.snr(500).item() == pytest.approx((abar / (1 - abar)).item())


def test_unknown_schedule_kind_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("quadratic", 10)
