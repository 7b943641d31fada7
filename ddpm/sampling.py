"""Reverse process: one DDPM or DDIM step, and the sampling loop that chains them.

A sampler visits a decreasing subset of timesteps t_1 > t_2 > ... > t_S and finally
"t = -1", where alpha_bar is taken as 1 (the clean data). Each step asks the network for
its prediction, turns it into the pair (x0, eps) and moves to the next timestep:

* DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12) is deterministic
  for eta = 0 and equals ancestral sampling for eta = 1.
* DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) draws from the posterior
  q(x_{t'} | x_t, x0) with the fixed-small variance. Between non-adjacent timesteps it uses
  the respaced posterior of Nichol & Dhariwal 2021 (Sec. 4): beta = 1 - abar_t / abar_t'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule
from .winograd import reused_weight_transforms

SPACINGS = ("leading", "trailing", "linspace")


def timestep_subset(timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The ``steps`` timesteps a sampler visits, in decreasing order.

    Spacings of Lin et al. 2024, Table 2: ``leading`` floor(i T/S), which never reaches T-1;
    ``trailing`` round(T - i T/S) - 1, which always starts at T-1; ``linspace`` round of
    S evenly spaced points over [0, T-1].
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    if spacing == "leading":
        ts = [i * timesteps // steps for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(timesteps - i * timesteps / steps) - 1 for i in range(steps)]
    elif spacing == "linspace":
        ts = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return sorted(set(ts), reverse=True)


def _abar(schedule: NoiseSchedule, t, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t broadcast against ``like``, with alpha_bar = 1 for t < 0 (the data)."""
    if isinstance(t, torch.Tensor):
        t = t.to(like.device).long()
        abar = schedule.alphas_cumprod.to(like.device)[t.clamp(min=0)]
        abar = torch.where(t < 0, torch.ones_like(abar), abar).to(like.dtype)
        return abar.reshape(abar.shape + (1,) * (like.ndim - abar.ndim))
    return torch.tensor(1.0 if t < 0 else float(schedule.alphas_cumprod[t]), dtype=like.dtype)


def ddim_update(x0, eps, abar_t, abar_prev, eta: float = 0.0, noise=None) -> torch.Tensor:
    """x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z (Song et al. 2021, Eq. 12).

    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar') (Eq. 16).
    """
    sigma2 = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            noise = torch.randn_like(x0)
        x_prev = x_prev + sigma2.sqrt() * noise
    return x_prev


def ancestral_update(x0, x_t, abar_t, abar_prev, noise=None) -> torch.Tensor:
    """Draw x_{t'} ~ q(x_{t'} | x_t, x0) for any t' < t (Ho et al. 2020, Eq. 6-7, respaced).

    With beta = 1 - abar_t / abar_t' the posterior mean is
    sqrt(abar') beta / (1 - abar) x0 + sqrt(1 - beta) (1 - abar') / (1 - abar) x_t and its
    variance beta (1 - abar') / (1 - abar), which is zero when t' is the data (abar' = 1).
    """
    beta = 1 - abar_t / abar_prev
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    variance = beta * (1 - abar_prev) / (1 - abar_t)
    if noise is None:
        noise = torch.randn_like(x_t)
    return mean + variance.sqrt() * noise


def ddim_step(schedule: NoiseSchedule, x_t, eps, t, t_prev, eta: float = 0.0, noise=None):
    """One DDIM step from timestep ``t`` to ``t_prev`` given the predicted noise ``eps``.

    ``t_prev < 0`` is the final step to x0 (alpha_bar taken as 1 there). See :func:`ddim_update`.
    """
    x0 = schedule.predict_x0(x_t, t, eps)
    return ddim_update(x0, eps, _abar(schedule, t, x_t), _abar(schedule, t_prev, x_t), eta, noise)


def ddpm_step(schedule: NoiseSchedule, x_t, eps, t, noise=None):
    """One ancestral step t -> t-1 with the fixed-small variance (Ho et al. 2020, Algorithm 2).

    No noise is added at t = 0, where the step returns the posterior mean, i.e. x0.
    """
    x0 = schedule.predict_x0(x_t, t, eps)
    mean, variance = schedule.posterior(x0, x_t, t)
    if noise is None:
        noise = torch.randn_like(x_t)
    return mean + variance.sqrt() * noise


def guided(model: torch.nn.Module, scale: float = 0.0, null_token: int | None = None, **cond):
    """A denoiser ``fn(x_t, t)`` calling ``model(x_t, t, **cond)``, with classifier-free guidance.

    With ``scale`` w > 0 the output is (1 + w) out_cond - w out_null (Ho & Salimans 2022,
    Eq. 6), where out_null replaces ``token`` by the null token. Both halves run as one batch.
    Tensors in ``cond`` other than ``token`` (positions, concatenated channels) are shared.
    """
    if scale and null_token is None:
        raise ValueError("classifier-free guidance needs the model's null_token")
    extra = cond.pop("extra_channels", None)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = x_t if extra is None else torch.cat([x_t, extra], dim=1)
        if not scale:
            return model(x_in, t, **cond)
        token = cond["token"]
        both = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        both["token"] = torch.cat([token, torch.full_like(token, null_token)])
        out_cond, out_null = model(torch.cat([x_in, x_in]), torch.cat([t, t]), **both).chunk(2)
        return out_cond + scale * (out_cond - out_null)

    return fn


@torch.inference_mode()
@reused_weight_transforms()  # the same weights at every step
def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    shape=None,
    *,
    x_T: torch.Tensor | None = None,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    spacing: str = "trailing",
    prediction: str = "eps",
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    device=None,
    return_x0: bool = False,
    progress: bool = True,
):
    """Generate samples by running the reverse process from pure noise.

    ``denoiser(x_t, t)`` returns the network's prediction of kind ``prediction`` (see
    :func:`guided` to build one from a model and its conditions). Start from ``x_T`` or from
    noise of ``shape`` drawn with ``generator``. ``clip_x0`` clamps the predicted x0 to the data
    range at every step (None: no clipping). Returns x0, or (x0, [x0 prediction per step])
    with ``return_x0``.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddim' or 'ddpm'")
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs either shape or x_T")
        x_T = torch.randn(shape, generator=generator, device=device)
    x = x_T
    schedule = schedule.to(x.device)
    ts = timestep_subset(schedule.timesteps, steps, spacing)
    x0_history = []
    for i, t in enumerate(tqdm(ts, desc="sampling", leave=False, disable=not progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        output = denoiser(x, t_batch).float()
        x0, eps = schedule.x0_and_eps(x, t_batch, output, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(*clip_x0)
            eps = schedule.predict_eps(x, t_batch, x0)
        if return_x0:
            x0_history.append(x0)
        abar_t, abar_prev = (
            _abar(schedule, t_batch, x),
            _abar(schedule, t_batch.new_full((1,), t_prev), x),
        )
        # Fresh noise only where the step is stochastic; the last step (to x0) adds none.
        if t_prev >= 0 and (sampler == "ddpm" or eta > 0):
            noise = torch.randn(x.shape, generator=generator, device=x.device)
        else:
            noise = torch.zeros_like(x)
        if sampler == "ddim":
            x = ddim_update(x0, eps, abar_t, abar_prev, eta, noise)
        else:
            x = ancestral_update(x0, x, abar_t, abar_prev, noise)
    return (x, x0_history) if return_x0 else x
