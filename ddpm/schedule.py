"""The forward (noising) process of a DDPM and the identities between its quantities.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239):
``beta_t`` is the noise variance added at step t, ``alpha_t = 1 - beta_t`` and
``alpha_bar_t = prod_{s<=t} alpha_s``. Timesteps are 0-based: t = 0 .. T-1, so the paper's
step t=1 is index 0 here. Everything is computed in float64 and stored as float32.

The three things a network may predict, and how each gives the others:
    eps  the noise that was added                         (Ho et al. 2020)
    x0   the clean sample                                 (Ho et al. 2020, Sec. 3.2)
    v    sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022, Sec. 4)
"""

from __future__ import annotations

import math

import torch
from torch import nn

PREDICTIONS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine", "sigmoid")


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas from 1e-4 to 0.02 at T=1000 (Ho et al. 2020, Sec. 4).

    For other T the end points are scaled by 1000/T so the total noise stays comparable
    (Nichol & Dhariwal 2021, Sec. 3.2).
    """
    scale = 1000.0 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def betas_from_alpha_bar(alpha_bar_fn, timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """betas from a continuous alpha_bar(s), s in [0, 1]: beta_t = 1 - abar(t+1)/abar(t).

    Capped at ``max_beta`` to avoid the singularity at the end of the schedule
    (Nichol & Dhariwal 2021, Sec. 3.2, after Eq. 17).
    """
    s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = alpha_bar_fn(s)
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).

    Nichol & Dhariwal 2021, "Improved DDPM", Eq. 17; s = 0.008, betas capped at 0.999.
    """

    def f(u):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar(lambda u: f(u) / f(torch.zeros(())), timesteps, max_beta)


def sigmoid_betas(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> torch.Tensor:
    """Sigmoid schedule: abar(t) = (sig(e/tau) - sig((t(e-s)+s)/tau)) / (sig(e/tau) - sig(s/tau)).

    With s = ``start``, e = ``end``.
    Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", Algorithm 1.
    """
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def abar(u):
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(abar, timesteps, max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 while abar_0 is unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1. The last step then holds pure noise (SNR 0), as sampling assumes.
    Use it with the v or x0 prediction: eps cannot give x0 where abar = 0.
    """
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(kind: str, timesteps: int) -> torch.Tensor:
    """float64 betas of the named schedule: ``linear``, ``cosine`` or ``sigmoid``."""
    makers = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
    if kind not in makers:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULES}")
    return makers[kind](timesteps)


class NoiseSchedule(nn.Module):
    """A discrete noise schedule with the forward process and its closed-form identities.

    ``betas`` and ``alphas_cumprod`` (length ``timesteps``) are float32 buffers, so
    ``schedule.to(device)`` moves them. ``t`` arguments are an int or a (B,) integer tensor.
    """

    def __init__(
        self, kind: str = "cosine", timesteps: int = 1000, zero_terminal_snr: bool = False
    ):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.kind, self.timesteps, self.zero_terminal_snr = kind, timesteps, zero_terminal_snr
        betas = make_betas(kind, timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # Posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 6-7); at t=0 its variance is 0.
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        buffers = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "posterior_variance": post_var,
            "posterior_mean_coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef_xt": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def describe(self) -> dict:
        """The settings that define this schedule (recorded in checkpoints, compared by checks)."""
        return {
            "kind": self.kind,
            "timesteps": self.timesteps,
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @staticmethod
    def _at(buffer: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """buffer[t] shaped (B, 1, 1, ...) to broadcast against ``like`` (B, C, *spatial)."""
        if not isinstance(t, torch.Tensor):
            return buffer[int(t)].to(like.dtype)
        values = buffer.to(t.device)[t.long()].to(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, Eq. 4, for x0)."""
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(
            self.sqrt_alphas_cumprod, t, x_t
        )

    def predict_eps(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (Ho et al. 2020, Eq. 4, for eps)."""
        return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def velocity(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * eps
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, Appendix D)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def eps_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (Salimans & Ho 2022, Appendix D)."""
        return (
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + self._at(self.sqrt_alphas_cumprod, t, x_t) * v
        )

    def training_target(
        self, x0: torch.Tensor, t, eps: torch.Tensor, prediction: str
    ) -> torch.Tensor:
        """What a network trained for ``prediction`` (eps | x0 | v) should output."""
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        if prediction == "v":
            return self.velocity(x0, t, eps)
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

    def x0_and_eps(self, x_t: torch.Tensor, t, output: torch.Tensor, prediction: str):
        """Turn a network ``output`` of kind ``prediction`` into the pair (x0, eps)."""
        if prediction == "eps":
            return self.predict_x0(x_t, t, output), output
        if prediction == "x0":
            return output, self.predict_eps(x_t, t, output)
        if prediction == "v":
            return self.x0_from_v(x_t, t, output), self.eps_from_v(x_t, t, output)
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t):
        """Mean and fixed-small variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 6-7).

        mean = [beta_t sqrt(abar_{t-1}) x0 + (1 - abar_{t-1}) sqrt(alpha_t) x_t] / (1 - abar_t),
        variance = beta_t (1 - abar_{t-1}) / (1 - abar_t), zero at t = 0.
        """
        mean = (
            self._at(self.posterior_mean_coef_x0, t, x_t) * x0
            + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        )
        return mean, self._at(self.posterior_variance, t, x_t)

    def reverse_variance(self, t, like: torch.Tensor, kind: str = "small") -> torch.Tensor:
        """Variance of p(x_{t-1} | x_t): ``small`` is the posterior's, ``large`` is beta_t.

        The two bounds of Ho et al. 2020, Sec. 3.2 (sigma_t^2 = beta~_t or beta_t).
        """
        if kind == "small":
            return self._at(self.posterior_variance, t, like)
        if kind == "large":
            return self._at(self.betas, t, like)
        raise ValueError(f"unknown variance kind {kind!r}; expected 'small' or 'large'")

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021, Eq. 1)."""
        abar = (
            self.alphas_cumprod[t]
            if not isinstance(t, torch.Tensor)
            else self.alphas_cumprod.to(t.device)[t.long()]
        )
        return abar / (1.0 - abar)
