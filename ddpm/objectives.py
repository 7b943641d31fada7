"""What the network learns to output, and the loss of one training batch.

An objective turns a clean batch ``x0`` into a network input and a target, calls the model
(under autocast) and scores its output. The loss itself is computed in float32.
"""

from __future__ import annotations

import contextlib

import torch

from .losses import DiffusionLoss
from .schedule import NoiseSchedule


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
        x_in = x_t if extra is None else torch.cat([x_t, extra], dim=1)
        with autocast():
            out = model(x_in, t, **cond)
        target = self.schedule.training_target(x0, t, noise, self.prediction)
        lesion = x0[:, 1:2] > 0 if x0.shape[1] > 1 else None  # the mask channel of JS-DDPM
        return self.loss_fn(out.float(), target, lesion=lesion, snr=self.schedule.snr(t))
