"""Samplers: single steps against their closed forms, and the loop against an oracle."""

import pytest
import torch

from ddpm.sampling import SPACINGS, ddim_step, ddpm_step, guided, sample, timestep_subset
from ddpm.schedule import NoiseSchedule


def _oracle(schedule, x0, prediction="eps"):
    """A perfect denoiser for the single data point x0: it returns the exact target."""

    def fn(x_t, t):
        eps = schedule.predict_eps(x_t, t, x0)
        return schedule.training_target(x0, t, eps, prediction)

    return fn


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_ddim_with_an_oracle_lands_on_x0(spacing, steps):
    s = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 2, 8, 8, generator=g) * 2 - 1
    out = sample(
        _oracle(s, x0),
        s,
        x0.shape,
        steps=steps,
        spacing=spacing,
        generator=g,
        clip_x0=None,
        progress=False,
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddim_oracle_works_for_every_prediction_target(prediction):
    s = NoiseSchedule("linear", 1000, zero_terminal_snr=True)
    x0 = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    out = sample(
        _oracle(s, x0, prediction),
        s,
        x0.shape,
        steps=20,
        prediction=prediction,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_with_an_oracle_also_land_on_x0(sampler, eta):
    s = NoiseSchedule("cosine", 1000)
    x0 = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = sample(
        _oracle(s, x0),
        s,
        x0.shape,
        steps=25,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(2),
        progress=False,
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_timestep_subsets_follow_their_spacing():
    assert timestep_subset(1000, 10, "leading") == list(range(900, -1, -100))
    assert timestep_subset(1000, 10, "trailing") == list(range(999, 0, -100))
    assert timestep_subset(1000, 10, "linspace")[0] == 999
    assert timestep_subset(1000, 10, "linspace")[-1] == 0
    for spacing in SPACINGS:
        assert timestep_subset(1000, 1000, spacing) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        timestep_subset(1000, 0)


def test_ddim_step_matches_song_et_al_eq12():
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(5)
    x_t, eps, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, t_prev, eta = 600, 400, 0.7
    a_t, a_p = s.alphas_cumprod[t].double(), s.alphas_cumprod[t_prev].double()
    x0 = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    expected = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * eps.double() + sigma * noise.double()
    got = ddim_step(s, x_t, eps, t, t_prev, eta=eta, noise=noise)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_ddim_final_step_returns_predicted_x0():
    s = NoiseSchedule("cosine", 1000)
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    got = ddim_step(s, x_t, eps, torch.tensor([20, 20]), -1)
    torch.testing.assert_close(got, s.predict_x0(x_t, 20, eps))


def test_ddpm_step_matches_ho_et_al_algorithm2():
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(6)
    x_t, eps, z = (torch.randn(2, 2, 4, 4, generator=g) for _ in range(3))
    t = 500
    beta, alpha, abar = s.betas[t].double(), 1 - s.betas[t].double(), s.alphas_cumprod[t].double()
    sigma = s.posterior_variance[t].double().sqrt()
    expected = (
        x_t.double() - beta / (1 - abar).sqrt() * eps.double()
    ) / alpha.sqrt() + sigma * z.double()
    torch.testing.assert_close(
        ddpm_step(s, x_t, eps, t, noise=z).double(), expected, rtol=1e-5, atol=1e-5
    )


def test_ddpm_step_adds_no_noise_at_t0():
    s = NoiseSchedule("cosine", 1000)
    x_t, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    a = ddpm_step(s, x_t, eps, 0, noise=torch.randn(1, 1, 4, 4))
    b = ddpm_step(s, x_t, eps, 0, noise=torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, s.predict_x0(x_t, 0, eps), rtol=1e-5, atol=1e-5)


def test_same_generator_seed_gives_the_same_samples():
    s = NoiseSchedule("cosine", 100)
    fn = lambda x, t: 0.1 * x  # noqa: E731
    runs = [
        sample(
            fn,
            s,
            (2, 1, 4, 4),
            steps=10,
            sampler="ddpm",
            progress=False,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_clip_x0_keeps_every_intermediate_prediction_in_range():
    s = NoiseSchedule("cosine", 100)
    fn = lambda x, t: -5 * x  # noqa: E731  (a wild eps makes x0 leave [-1, 1])
    _, history = sample(
        fn,
        s,
        (1, 1, 4, 4),
        steps=10,
        return_x0=True,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(history) == 10
    assert all(h.abs().max() <= 1.0 for h in history)


class _TokenEcho(torch.nn.Module):
    """Returns the token as a constant field, so guidance arithmetic can be checked."""

    def forward(self, x, t, token):
        return token.float().view(-1, 1, 1, 1).expand_as(x)


def test_classifier_free_guidance_extrapolates_away_from_the_null_output():
    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    token = torch.tensor([3, 5])
    out = guided(_TokenEcho(), scale=2.0, null_token=10, token=token)(x, t)
    # (1 + w) * cond - w * null = 3 * token - 2 * 10
    torch.testing.assert_close(out[:, 0, 0, 0], 3 * token.float() - 20)
    plain = guided(_TokenEcho(), token=token)(x, t)
    torch.testing.assert_close(plain[:, 0, 0, 0], token.float())
