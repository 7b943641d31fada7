"""Whole-volume dose prediction with any objective, window by window.

A dose model is trained on patches; a patient is larger. Every network call here goes
through a :class:`ddpm.inference.SlidingWindow` with Gaussian-weighted overlap:

- regression: one blended pass over the anatomy;
- diffusion and flow: the noise state is the whole volume, and *every* sampler step
  evaluates the network window by window on (state, anatomy) and blends the outputs
  before the step's update, so all windows see one consistent state and no seam can grow
  over the steps.

Samples are drawn from fixed seeds, one initial noise volume per seed (``seed`` alone
decides sample k's starting noise, whatever else is in the batch), so an ensemble of N is
the first N of an ensemble of 10.
"""

from __future__ import annotations

import torch

from .flow import TIME_SCALE, flow_sample
from .inference import SlidingWindow, windowed
from .sampling import sample
from .schedule import NoiseSchedule

ANATOMY_PAD = -1.0  # outside the volume: air for the CT, outside for every structure mask
STATE_PAD = 0.0  # outside the volume: the mean of the noise


def volume_window(cfg, conditioning_only: bool, progress: bool = False) -> SlidingWindow:
    """The sliding window of ``cfg.dose`` (patch-sized windows) for a network whose input is
    the anatomy alone (``conditioning_only``, regression) or (state, anatomy)."""
    d = cfg.dose
    pads = [ANATOMY_PAD] * d.anatomy_channels
    if not conditioning_only:
        pads = [STATE_PAD] * cfg.model.in_channels + pads
    return SlidingWindow([d.patch_size] * 3, overlap=d.window_overlap, batch_size=d.window_batch,
                         progress=progress, pad_value=pads)


def initial_noise(seeds, shape, device) -> torch.Tensor:
    """(len(seeds), *shape) N(0, I) volumes, volume k drawn from a generator seeded seeds[k]."""
    return torch.cat([torch.randn((1, *shape), device=device,
                                  generator=torch.Generator(device).manual_seed(int(s)))
                      for s in seeds])


@torch.inference_mode()
def predict_dose(model: torch.nn.Module, cfg, anatomy: torch.Tensor, *,
                 schedule: NoiseSchedule | None = None, steps: int | None = None, seeds=(0,),
                 autocast_dtype=None, progress: bool = False) -> torch.Tensor:
    """Model-space dose of one patient: (N, out_channels, *spatial) float32.

    ``anatomy`` (A, *spatial) or (1, A, *spatial) on the model's device, in model space.
    ``cfg`` is the run's config (objective, sampler, window). Regression returns its one
    prediction (N = 1); diffusion and flow return one sample per seed in ``seeds`` after
    ``steps`` sampler steps (default ``cfg.sample.steps``): DDIM/DDPM with the config's eta,
    spacing, prediction target and x0 clipping; flow with ``cfg.flow.solver``, its final
    state clamped to [-1, 1] when ``cfg.sample.clip_x0`` (as the diffusion x0 is).
    ``schedule`` is needed for diffusion. The model is called in eval mode by the caller.
    """
    device = next(model.parameters()).device
    anatomy = anatomy if anatomy.ndim == 5 else anatomy[None]  # (1, A, *S)
    anatomy = anatomy.to(device=device, dtype=torch.float32)
    objective = cfg.model.objective
    steps = cfg.sample.steps if steps is None else int(steps)

    def network(windows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            return model(windows, t).float()

    if objective == "regression":
        evaluator = volume_window(cfg, conditioning_only=True, progress=progress)
        t = torch.zeros(1, device=device, dtype=torch.long)
        return evaluator(network, anatomy, (t,))  # (1, C, *S)

    seeds = list(seeds)
    if not seeds:
        raise ValueError("predict_dose needs at least one seed for a generative model")
    shape = (cfg.model.out_channels, *anatomy.shape[2:])
    x_start = initial_noise(seeds, shape, device)  # (N, C, *S)
    condition = anatomy.expand(len(seeds), *anatomy.shape[1:])
    evaluator = volume_window(cfg, conditioning_only=False)
    if objective == "diffusion":
        if schedule is None:
            raise ValueError("predict_dose: a diffusion model needs its noise schedule")
        s = cfg.sample
        generator = torch.Generator(device).manual_seed(int(seeds[0]) + 10**6)  # DDPM/eta noise
        return sample(windowed(evaluator, network, condition), schedule.to(device),
                      x_T=x_start, steps=steps, sampler=s.sampler, eta=s.eta,
                      spacing=s.spacing, prediction=cfg.diffusion.prediction,
                      clip_x0=(-1.0, 1.0) if s.clip_x0 else None, generator=generator,
                      progress=progress)
    if objective == "flow":
        def velocity(windows: torch.Tensor, s_batch: torch.Tensor) -> torch.Tensor:
            return network(windows, s_batch * TIME_SCALE)

        x = flow_sample(windowed(evaluator, velocity, condition), x1=x_start, steps=steps,
                        method=cfg.flow.solver, progress=progress)
        return x.clamp(-1.0, 1.0) if cfg.sample.clip_x0 else x
    raise ValueError(f"unknown model.objective {objective!r}")
