"""What the model actually reconstructs: one-step x0 metrics on fixed validation slices.

A falling loss says little about a diffusion model whose EMA weights, schedule or metric
path is broken. These checks noise fixed validation slices to fixed timesteps with fixed
noise, ask the network for x0 in one step, and score it against the real slice. They run
for the live and the EMA weights alike, and :func:`alarms` turns bad numbers into words.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch

from .conditioning import model_conditions
from .metrics import dice, psnr, ssim
from .schedule import NoiseSchedule

DATA_RANGE = 2.0  # the cache maps images to [-1, 1]; masks are {-1, 1}


def fixed_validation_batch(dataset, n: int, seed: int = 0) -> dict:
    """A reproducible batch of ``n`` slices, half of them (when available) with lesions.

    Lesion slices are rare; without stratifying, the mask Dice could rest on no lesion at all.
    Returns the dataset's fields stacked, e.g. ``x`` (n, 2, H, W), ``token`` (n,).
    """
    g = torch.Generator().manual_seed(seed)
    pathology = torch.as_tensor(dataset.pathology)
    lesion = torch.nonzero(pathology == 1).flatten()
    healthy = torch.nonzero(pathology == 0).flatten()
    n = min(n, len(dataset))
    n_lesion = min(len(lesion), n // 2)
    pick = torch.cat([
        lesion[torch.randperm(len(lesion), generator=g)[:n_lesion]],
        healthy[torch.randperm(len(healthy), generator=g)[: n - n_lesion]],
    ])
    items = [dataset[int(i)] for i in pick]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def batch_conditions(batch: dict, mode: str, n_bins: int) -> dict:
    """UNet keyword arguments for a batch of dataset items (see ``model_conditions``)."""
    return model_conditions(mode, n_bins, batch["z_bin"], batch["pathology"], batch.get("position"))


@torch.inference_mode()
def reconstruction_metrics(
    model,
    schedule: NoiseSchedule,
    batch: dict,
    timesteps,
    *,
    prediction: str,
    conditioning: str,
    n_bins: int,
    seed: int = 0,
    autocast_dtype=None,
) -> dict:
    """One-step x0 reconstruction PSNR / SSIM (image channel) and Dice (mask) per timestep.

    x_t = q_sample(x0, t, eps) with fixed noise; x0_hat from one network call, clamped to the
    data range [-1, 1] (the sampler's clipping, nothing else). PSNR and SSIM use data range
    2; Dice thresholds both masks at 0 and averages over slices whose real mask holds a lesion
    (NaN when none does). Returns {"psnr_t50": dB, "ssim_t50": ..., "dice_t50": ..., ...}.
    """
    device = next(model.parameters()).device
    x0 = batch["x"].to(device).float()  # (B, 2, H, W)
    cond = {k: v.to(device) for k, v in batch_conditions(batch, conditioning, n_bins).items()}
    extra = batch["prior"].to(device) if "prior" in batch else None
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    has_lesion = (x0[:, 1] > 0).flatten(1).any(dim=1)
    out = {}
    for t in timesteps:
        t_batch = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
        x_t = schedule.q_sample(x0, t_batch, noise)
        x_in = x_t if extra is None else torch.cat([x_t, extra], dim=1)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            pred = model(x_in, t_batch, **cond)
        x0_hat = schedule.x0_and_eps(x_t, t_batch, pred.float(), prediction)[0].clamp(-1, 1)
        image, image_hat = x0[:, :1], x0_hat[:, :1]
        out[f"psnr_t{t}"] = float(psnr(image_hat, image, DATA_RANGE).mean())
        out[f"ssim_t{t}"] = float(ssim(image_hat, image, DATA_RANGE).mean())
        if has_lesion.any():
            d = dice(x0_hat[has_lesion, 1:] > 0, x0[has_lesion, 1:] > 0)
            out[f"dice_t{t}"] = float(d.mean())
        else:
            out[f"dice_t{t}"] = math.nan
    return out


def alarms(live: dict, ema: dict, t_check: int, gap_db: float, after_warmup: bool) -> list[str]:
    """Plain-words warnings when the reconstructions contradict a falling loss.

    Raised when the EMA's PSNR at ``t_check`` is ``gap_db`` or more below the live model's,
    or when (after the LR warm-up) either stays below 0 dB.
    """
    key = f"psnr_t{t_check}"
    messages = []
    if ema[key] < live[key] - gap_db:
        messages.append(
            f"EMA x0-PSNR at t={t_check} is {ema[key]:.1f} dB, {live[key] - ema[key]:.1f} dB below "
            f"the live model's {live[key]:.1f} dB. Likely causes: EMA decay too high for the "
            "number of updates so far (e.g. 0.9999 without warm-up needs ~10^4 steps), EMA "
            "warm-up off, or EMA weights not updated/restored. Try ema.warmup: true, a lower "
            "ema.decay, or evaluate the live weights until the EMA has caught up."
        )
    if after_warmup and min(live[key], ema[key]) < 0:
        messages.append(
            f"x0-PSNR at t={t_check} is below 0 dB (live {live[key]:.1f}, EMA {ema[key]:.1f}) "
            "after the warm-up: the model reconstructs worse than predicting zeros. Likely "
            "causes: the sampling/metric schedule differs from the training schedule, a wrong "
            "prediction target (eps vs x0 vs v), data outside [-1, 1] (check the cache's "
            "normalisation), or post-processing in the metric path."
        )
    return messages


def validate_live_and_ema(model, ema, schedule, batch: dict, cfg, autocast_dtype=None):
    """Reconstruction metrics of the live and of the EMA weights on the same fixed batch."""
    kwargs = dict(prediction=cfg.diffusion.prediction, conditioning=cfg.model.conditioning,
                  n_bins=cfg.data.n_bins, autocast_dtype=autocast_dtype)
    was_training = model.training
    model.eval()
    live = reconstruction_metrics(model, schedule, batch, cfg.eval.timesteps, **kwargs)
    with ema.swapped_in(model):
        ema_metrics = reconstruction_metrics(model, schedule, batch, cfg.eval.timesteps, **kwargs)
    model.train(was_training)
    return live, ema_metrics


def grid_conditions(n_bins: int, max_bins: int = 6):
    """(z_bins, pathologies) of a sample grid: up to ``max_bins`` bins spread over the range,
    each with a healthy and a lesion row."""
    n = min(n_bins, max_bins)
    bins = sorted({round(i * (n_bins - 1) / max(1, n - 1)) for i in range(n)})
    z_bins = torch.tensor([b for b in bins for _ in (0, 1)])
    pathology = torch.tensor([p for _ in bins for p in (0, 1)])
    return z_bins, pathology


def write_sample_grid(model, ema, schedule, cfg, priors: dict, image_size: int, path) -> None:
    """DDIM samples of the EMA weights for fixed seeds and tokens covering bins and classes."""
    from .builders import prior_channel  # local: builders imports the UNet
    from .sampling import guided, sample
    from .viz import sample_grid

    device = next(model.parameters()).device
    z_bins, pathology = grid_conditions(cfg.data.n_bins)
    n = max(cfg.sample.n_per_condition, 3)
    z_bins, pathology = z_bins.repeat_interleave(n), pathology.repeat_interleave(n)
    cond = batch_conditions({"z_bin": z_bins, "pathology": pathology}, cfg.model.conditioning,
                            cfg.data.n_bins)
    cond = {k: v.to(device) for k, v in cond.items()}
    shape = (len(z_bins), cfg.model.out_channels, image_size, image_size)
    extra = prior_channel(priors, z_bins).to(device) if cfg.model.use_prior else None
    was_training = model.training
    model.eval()
    with ema.swapped_in(model):
        fn = guided(model, cfg.sample.guidance, model.null_token, extra_channels=extra, **cond)
        x = sample(fn, schedule, shape, steps=cfg.sample.steps, eta=cfg.sample.eta,
                   spacing=cfg.sample.spacing, prediction=cfg.diffusion.prediction,
                   clip_x0=(-1.0, 1.0) if cfg.sample.clip_x0 else None, device=device,
                   generator=torch.Generator(device).manual_seed(cfg.sample.seed), progress=False)
    model.train(was_training)
    rows = x.reshape(-1, n, *x.shape[1:]).cpu()  # (conditions, n, C, H, W)
    labels = [f"bin {int(b)}, {'lesion' if int(p) else 'healthy'}"
              for b, p in zip(z_bins[::n], pathology[::n])]
    sample_grid(rows, labels, path, title=f"EMA samples, {cfg.sample.steps} DDIM steps")


def write_performance(path, rows: list[dict]) -> None:
    """Rewrite ``performance.csv`` atomically with every validation row so far."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
