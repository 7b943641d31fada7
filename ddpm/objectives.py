"""What the network learns to output, and the loss of one training batch.

Three objectives share one call signature, so the training loop does not care which it runs:

    objective(model, x0, cond, extra, generator, autocast) -> (loss, parts)

``x0`` (B, C, *spatial) is the clean target (lesion: image + mask; dose: the dose), ``cond``
the model's keyword arguments (class tokens, positions; empty for dose), ``extra`` the
conditioning channels concatenated to the network input (the prior, the dose anatomy) or
None, ``generator`` the training noise generator and ``autocast`` a context factory.
``parts`` holds detached loss components for the log. The network runs under autocast; the
loss is computed in float32.

- :class:`DiffusionObjective`: a DDPM, target eps, x0 or v.
- :class:`FlowObjective`: flow matching on the straight path, target the velocity.
- :class:`RegressionObjective`: the target predicted directly from ``extra``.

Each also gives :meth:`one_step_x0`, the clean sample the network implies from one call at a
given noise level (validation scores it), and :func:`build_objective` picks one from the
config.
"""

from __future__ import annotations

import contextlib

import torch

from . import flow
from .losses import DiffusionLoss, regression_loss
from .schedule import NoiseSchedule


def _network_input(x: torch.Tensor, extra) -> torch.Tensor:
    """The network input: the state with the conditioning channels after it (B, C + C', *S)."""
    return x if extra is None else torch.cat([x, extra], dim=1)


class DiffusionObjective:
    """DDPM training (Ho et al. 2020, Algorithm 1) for the eps, x0 or v target.

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps); the network sees x_t (with any
    extra input channels concatenated) and its output is compared with the target by the
    per-channel :class:`DiffusionLoss`. With ``cond_drop_prob`` > 0 the class token is replaced
    by the null token that often, which trains the unconditional model classifier-free
    guidance needs (Ho & Salimans 2022, Algorithm 1).
    """

    def __init__(self, schedule: NoiseSchedule, loss_fn: DiffusionLoss, prediction: str,
                 cond_drop_prob: float = 0.0, null_token: int | None = None):
        self.schedule, self.loss_fn, self.prediction = schedule, loss_fn, prediction
        self.cond_drop_prob, self.null_token = cond_drop_prob, null_token

    def __call__(self, model, x0, cond: dict, extra, generator, autocast=contextlib.nullcontext):
        """(loss, parts) for one batch: ``x0`` (B, C, *spatial), ``extra`` channels or None."""
        b, device = x0.shape[0], x0.device
        t = torch.randint(0, self.schedule.timesteps, (b,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        if self.cond_drop_prob > 0 and "token" in cond:
            drop = torch.rand(b, device=device, generator=generator) < self.cond_drop_prob
            null = torch.full_like(cond["token"], self.null_token)
            cond = {**cond, "token": torch.where(drop, null, cond["token"])}
        with autocast():
            out = model(_network_input(x_t, extra), t, **cond)
        target = self.schedule.training_target(x0, t, noise, self.prediction)
        lesion = x0[:, 1:2] > 0 if x0.shape[1] > 1 else None  # the mask channel of JS-DDPM
        return self.loss_fn(out.float(), target, lesion=lesion, snr=self.schedule.snr(t))

    @torch.no_grad()
    def one_step_x0(self, model, x0, cond: dict, extra, t: int, noise,
                    autocast=contextlib.nullcontext) -> torch.Tensor:
        """x0 implied by one network call at timestep ``t`` from x_t = q_sample(x0, t, noise)."""
        t_batch = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
        x_t = self.schedule.q_sample(x0, t_batch, noise)
        with autocast():
            out = model(_network_input(x_t, extra), t_batch, **cond)
        return self.schedule.x0_and_eps(x_t, t_batch, out.float(), self.prediction)[0]


class FlowObjective:
    """Conditional flow matching on the straight path (Lipman et al. 2023, Eq. 23).

    s from ``time_sampling`` (uniform, or logit-normal: Esser et al. 2024, Eq. 19),
    n ~ N(0, I), x_s = (1 - s) x0 + s n; the network sees x_s (with the conditioning
    channels) at time s * ``flow.TIME_SCALE`` and regresses the velocity v = n - x0 with the
    per-channel MSE of :class:`DiffusionLoss` (``ddpm.flow`` documents the conventions).
    ``timesteps`` only maps the integer noise levels of validation to times, s = t / timesteps.
    """

    def __init__(self, loss_fn: DiffusionLoss, time_sampling: str = "uniform",
                 logit_loc: float = 0.0, logit_scale: float = 1.0, timesteps: int = 1000):
        self.loss_fn, self.time_sampling = loss_fn, time_sampling
        self.logit_loc, self.logit_scale, self.timesteps = logit_loc, logit_scale, timesteps

    def __call__(self, model, x0, cond: dict, extra, generator, autocast=contextlib.nullcontext):
        """(loss, parts) for one batch: ``x0`` (B, C, *spatial), ``extra`` channels or None."""
        s = flow.sample_times(x0.shape[0], generator, self.time_sampling, loc=self.logit_loc,
                              scale=self.logit_scale, device=x0.device)  # (B,)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_s = flow.interpolate(x0, noise, s)
        with autocast():
            out = model(_network_input(x_s, extra), s * flow.TIME_SCALE, **cond)
        return self.loss_fn(out.float(), flow.velocity_target(x0, noise))

    @torch.no_grad()
    def one_step_x0(self, model, x0, cond: dict, extra, t: int, noise,
                    autocast=contextlib.nullcontext) -> torch.Tensor:
        """x0 = x_s - s v implied by one network call at time s = t / ``timesteps``."""
        s_batch = torch.full((x0.shape[0],), t / self.timesteps, device=x0.device)
        x_s = flow.interpolate(x0, noise, s_batch)
        with autocast():
            out = model(_network_input(x_s, extra), s_batch * flow.TIME_SCALE, **cond)
        return flow.predict_x0(x_s, s_batch, out.float())


class RegressionObjective:
    """Direct regression: the network maps the conditioning channels ``extra`` to x0.

    No noise, no state: the input is ``extra`` alone and the time input a constant 0 (the
    UNet's time embedding then acts as a learnt bias). Loss: L1 or MSE, plus
    ``gradient_weight`` times the finite-difference gradient loss (``losses.regression_loss``).
    """

    def __init__(self, kind: str = "l1", gradient_weight: float = 0.0):
        self.kind, self.gradient_weight = kind, gradient_weight

    def __call__(self, model, x0, cond: dict, extra, generator, autocast=contextlib.nullcontext):
        """(loss, parts) for one batch; ``generator`` is unused (nothing is random here)."""
        out = self.predict(model, extra, cond, autocast)
        return regression_loss(out, x0.float(), self.kind, self.gradient_weight)

    def predict(self, model, extra, cond: dict, autocast=contextlib.nullcontext) -> torch.Tensor:
        """The network's x0 for conditioning channels ``extra`` (B, C', *S), as float32."""
        if extra is None:
            raise ValueError("regression needs conditioning channels (the anatomy) as input")
        t = torch.zeros(extra.shape[0], device=extra.device, dtype=torch.long)
        with autocast():
            return model(extra, t, **cond).float()

    @torch.no_grad()
    def one_step_x0(self, model, x0, cond: dict, extra, t, noise,
                    autocast=contextlib.nullcontext) -> torch.Tensor:
        """The prediction itself (``t`` and ``noise`` are ignored: there is no noise level)."""
        return self.predict(model, extra, cond, autocast)


def build_objective(cfg, schedule: NoiseSchedule, loss_fn: DiffusionLoss,
                    null_token: int | None = None):
    """The objective ``cfg.model.objective`` names, set up from the config."""
    kind = cfg.model.objective
    if kind == "diffusion":
        return DiffusionObjective(schedule, loss_fn, cfg.diffusion.prediction,
                                  cfg.diffusion.cond_drop_prob, null_token)
    if kind == "flow":
        f = cfg.flow
        return FlowObjective(loss_fn, f.time_sampling, f.logit_loc, f.logit_scale,
                             cfg.diffusion.timesteps)
    if kind == "regression":
        return RegressionObjective(cfg.loss.regression, cfg.loss.gradient_weight)
    raise ValueError(f"unknown model.objective {kind!r}; expected diffusion, flow or regression")
