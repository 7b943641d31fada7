"""The two workloads the training loop serves, behind one small interface.

``ddpm.trainer.train`` is the same loop for both; what differs lives here:

- ``LesionTask`` (``train.task: lesion``): 2D slices of the slice cache, (image, mask)
  generated with class tokens and an optional prior channel; validation scores one-step x0
  PSNR / SSIM / Dice; pictures are sample grids.
- ``DoseTask`` (``train.task: dose``): random 3D patches of the dose cache, the dose
  generated (or regressed) from the anatomy channels; validation scores the one-step x0
  dose error in Gy; pictures compare a sampled patch with the plan.

Each task provides: ``samples_per_epoch``, ``train_set`` and ``sampler`` (the epoch's
order as a pure function of (seed, epoch), with ``set_epoch(epoch, skip)`` for resuming),
``channel_names`` (the loss's per-channel names), ``unpack(batch, device) -> (x0, cond,
extra)``, ``validate(...) -> (row, warnings, summary)``, ``write_samples(...)`` and
``checkpoint_extras()`` (what a checkpoint carries so later steps need not trust a config).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .builders import load_priors
from .caching import ensure_cache, load_meta
from .data import SliceDataset
from .dose_cache import ensure_dose_cache, load_dose_meta
from .dose_data import DosePatchDataset
from .runtime import Dist, EpochSampler
from .validation import alarms, batch_conditions, fixed_validation_batch, validate_live_and_ema


def _cache_on_every_rank(ensure, dist_info: Dist, progress: bool):
    """Rank 0 builds the cache when absent; the others wait, then verify it."""
    if dist_info.is_main:
        cache_dir = ensure(progress)
    if dist_info.active:
        dist.barrier()
    if not dist_info.is_main:
        cache_dir = ensure(False)
    return cache_dir


def _autocast(device: torch.device, dtype):
    return lambda: torch.autocast(device.type, dtype=dtype or torch.float32,
                                  enabled=dtype is not None)


# ----------------------------------------------------------------------------- lesion


class LesionTask:
    """JS-DDPM: (image, mask) slices with class tokens, from the slice cache (``data``)."""

    channel_names = ("image", "mask")
    unit = "slices"

    def __init__(self, cfg, dist_info: Dist, config_path=None, progress: bool = True):
        self.cfg = cfg
        cache_dir = _cache_on_every_rank(
            lambda bar: ensure_cache(cfg.data, config_path, progress=bar), dist_info, progress)
        self.train_set = SliceDataset(cache_dir, "train", with_prior=cfg.model.use_prior)
        val_set = SliceDataset(cache_dir, "val", with_prior=cfg.model.use_prior)
        self.samples_per_epoch = len(self.train_set)
        self.sampler = EpochSampler(self.train_set.pathology, cfg.train.seed,
                                    cfg.data.oversample_lesions, dist_info)
        self.meta, self.priors = load_meta(cache_dir), load_priors(cache_dir)
        self.val_batch = fixed_validation_batch(val_set,
                                                cfg.eval.batch_size * cfg.eval.val_batches)

    def unpack(self, batch: dict, device) -> tuple:
        """(x0 (B, 2, H, W) image and mask in [-1, 1], model keyword arguments, prior or None)."""
        x0 = batch["x"].to(device, non_blocking=True)
        cond = batch_conditions(batch, self.cfg.model.conditioning, self.cfg.data.n_bins)
        cond = {k: v.to(device) for k, v in cond.items()}
        extra = batch["prior"].to(device) if self.cfg.model.use_prior else None
        return x0, cond, extra

    def validate(self, model, ema, objective, schedule, autocast_dtype, after_warmup: bool):
        """One-step x0 PSNR / SSIM / Dice of the live and the EMA weights, and the alarms."""
        live, ema_metrics = validate_live_and_ema(model, ema, schedule, self.val_batch,
                                                  self.cfg, autocast_dtype)
        t_check = min(self.cfg.eval.timesteps)
        warnings = alarms(live, ema_metrics, t_check, self.cfg.eval.alarm_psnr_gap_db,
                          after_warmup=after_warmup)
        row = {f"{k}_live": v for k, v in live.items()}
        row.update({f"{k}_ema": v for k, v in ema_metrics.items()})
        key = f"psnr_t{t_check}"
        summary = f"x0-PSNR t={t_check} live {live[key]:.2f} dB, EMA {ema_metrics[key]:.2f} dB"
        return row, warnings, summary

    def write_samples(self, model, ema, schedule, path) -> None:
        """A grid of EMA samples over z-bins and classes."""
        from .validation import write_sample_grid

        write_sample_grid(model, ema, schedule, self.cfg, self.priors, self.meta["image_size"],
                          path)

    def checkpoint_extras(self) -> dict:
        """The cache's meta and z-bin priors: sampling and evaluation read them from here."""
        return {"cache_meta": self.meta, "priors": self.priors}


# ----------------------------------------------------------------------------- dose

VAL_PATCH_SEED = 104729  # the fixed validation patches; any value, as long as it never changes
EMA_ALARM_RATIO = 1.5  # EMA error above 1.5 x the live model's (+ 0.5 Gy) raises the alarm


class PatchEpochSampler(Sampler):
    """Indices of one epoch of random patches for this rank.

    Item i of a ``DosePatchDataset`` is a random patch determined by (seed, i) alone, so
    epoch e simply takes items e N .. (e + 1) N - 1 (N = ``samples_per_epoch``): every
    epoch sees fresh patches and the order is a pure function of the epoch. Split across
    ranks like ``DistributedSampler`` (padded to equal length, then rank::world).
    """

    def __init__(self, samples_per_epoch: int, dist_info: Dist):
        self.n, self.dist = int(samples_per_epoch), dist_info
        self.per_rank = math.ceil(self.n / dist_info.world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and skip its first ``skip`` samples (for resuming)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        order = list(range(self.n))
        order += order[: self.per_rank * self.dist.world_size - self.n]  # pad
        mine = order[self.dist.rank :: self.dist.world_size][self.skip :]
        return iter(self.epoch * self.n + i for i in mine)


class DoseTask:
    """Dose prediction: 3D patches of the dose cache (``dose``); the anatomy is the condition."""

    channel_names = ("dose",)
    unit = "patches"

    def __init__(self, cfg, dist_info: Dist, config_path=None, progress: bool = True):
        d, self.cfg = cfg.dose, cfg
        cache_dir = _cache_on_every_rank(
            lambda bar: ensure_dose_cache(d, config_path, progress=bar), dist_info, progress)
        self.meta = load_dose_meta(cache_dir)
        anatomy = self.meta["channels"]["anatomy"]
        if len(anatomy) != d.anatomy_channels:
            raise ValueError(f"dose.anatomy_channels={d.anatomy_channels}, but the dose cache "
                             f"{cache_dir} holds {len(anatomy)} anatomy channels {anatomy}: set "
                             f"dose.anatomy_channels: {len(anatomy)}")
        self.dose_scale_gy = float(self.meta["normalisation"]["dose_scale_gy"])
        seed = cfg.train.seed
        # Patches per epoch: enough to cover every training voxel about once.
        self.samples_per_epoch = len(DosePatchDataset(cache_dir, "train", d.patch_size,
                                                      d.ptv_fraction, seed=seed))
        self.train_set = DosePatchDataset(
            cache_dir, "train", d.patch_size, d.ptv_fraction, seed=seed,
            samples_per_epoch=self.samples_per_epoch * max(cfg.train.epochs, 1))
        self.sampler = PatchEpochSampler(self.samples_per_epoch, dist_info)
        n_val = cfg.eval.batch_size * cfg.eval.val_batches
        val_set = DosePatchDataset(cache_dir, "val", d.patch_size, d.ptv_fraction,
                                   samples_per_epoch=n_val, seed=VAL_PATCH_SEED)
        items = [val_set[i] for i in range(n_val)]
        self.val_batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def unpack(self, batch: dict, device) -> tuple:
        """(dose (B, 1, P, P, P), no keyword arguments, anatomy (B, A, P, P, P)), model space."""
        return (batch["dose"].to(device, non_blocking=True), {},
                batch["anatomy"].to(device, non_blocking=True))

    def _levels(self) -> list:
        """Noise levels validation scores: the eval timesteps, or one level for regression."""
        return [None] if self.cfg.model.objective == "regression" else self.cfg.eval.timesteps

    @torch.no_grad()
    def dose_errors(self, model, objective, autocast_dtype=None) -> dict:
        """Mean absolute one-step x0 error in Gy on the validation patches, per noise level.

        Keys ``mae_gy_t{t}`` for diffusion and flow (flow: s = t / diffusion.timesteps),
        ``mae_gy`` for regression. Fixed noise, so numbers are comparable between epochs.
        """
        device = next(model.parameters()).device
        x0_all, extra_all = self.val_batch["dose"], self.val_batch["anatomy"]
        noise_all = torch.randn(x0_all.shape, generator=torch.Generator().manual_seed(0))
        clip = self.cfg.sample.clip_x0 and self.cfg.model.objective != "regression"
        autocast = _autocast(device, autocast_dtype)
        chunk = self.cfg.eval.batch_size
        out = {}
        for t in self._levels():
            total = 0.0
            for first in range(0, len(x0_all), chunk):
                x0 = x0_all[first:first + chunk].to(device)
                x0_hat = objective.one_step_x0(
                    model, x0, {}, extra_all[first:first + chunk].to(device), t,
                    noise_all[first:first + chunk].to(device), autocast)
                if clip:
                    x0_hat = x0_hat.clamp(-1.0, 1.0)
                total += float((x0_hat - x0).abs().sum())
            mae = total / x0_all.numel() * self.dose_scale_gy / 2  # model space -> Gy
            out["mae_gy" if t is None else f"mae_gy_t{t}"] = mae
        return out

    def validate(self, model, ema, objective, schedule, autocast_dtype, after_warmup: bool):
        """Validation-patch dose errors (Gy) of the live and the EMA weights, and the alarms."""
        was_training = model.training
        model.eval()
        live = self.dose_errors(model, objective, autocast_dtype)
        with ema.swapped_in(model):
            ema_errors = self.dose_errors(model, objective, autocast_dtype)
        model.train(was_training)
        key = next(iter(live))
        zero_gy = float((self.val_batch["dose"] + 1).abs().mean()) * self.dose_scale_gy / 2
        warnings = dose_alarms(live[key], ema_errors[key], key, zero_gy, after_warmup)
        row = {f"{k}_live": v for k, v in live.items()}
        row.update({f"{k}_ema": v for k, v in ema_errors.items()})
        summary = f"{key} live {live[key]:.2f} Gy, EMA {ema_errors[key]:.2f} Gy"
        return row, warnings, summary

    def write_samples(self, model, ema, schedule, path) -> None:
        """The first validation patch: CT, planned dose, the EMA model's dose, the error."""
        from .dose_plots import dose_panels
        from .dose_predict import predict_dose

        anatomy, reference = self.val_batch["anatomy"][0], self.val_batch["dose"][0, 0]
        was_training = model.training
        model.eval()
        with ema.swapped_in(model):
            pred = predict_dose(model, self.cfg, anatomy, schedule=schedule,
                                seeds=(self.cfg.sample.seed,))[0, 0].cpu()
        model.train(was_training)
        half = self.dose_scale_gy / 2
        objective = self.cfg.model.objective
        steps = "" if objective == "regression" else f", {self.cfg.sample.steps} steps"
        mae = float((pred - reference).abs().mean()) * half
        dose_panels(anatomy[0], (reference + 1) * half, {f"EMA {objective}": (pred + 1) * half},
                    path, title=f"validation patch{steps}: MAE {mae:.2f} Gy",
                    vmax=self.dose_scale_gy)

    def checkpoint_extras(self) -> dict:
        """The dose cache's meta: evaluation checks the cache it is given against it."""
        return {"cache_meta": self.meta}


def dose_alarms(live: float, ema: float, key: str, zero_gy: float, after_warmup: bool
                ) -> list[str]:
    """Plain-words warnings when the validation dose errors contradict a falling loss.

    Raised when the EMA's error is more than 1.5 times (+ 0.5 Gy) the live model's, or when
    (after the LR warm-up) both are no better than predicting 0 Gy everywhere (``zero_gy``).
    """
    messages = []
    if ema > EMA_ALARM_RATIO * live + 0.5:
        messages.append(
            f"EMA {key} is {ema:.2f} Gy against the live model's {live:.2f} Gy. Likely causes: "
            "EMA decay too high for the number of updates so far, EMA warm-up off, or EMA "
            "weights not updated/restored. Try ema.warmup: true or a lower ema.decay.")
    if after_warmup and min(live, ema) >= zero_gy:
        messages.append(
            f"{key} (live {live:.2f}, EMA {ema:.2f} Gy) is no better than predicting 0 Gy "
            f"everywhere ({zero_gy:.2f} Gy) after the warm-up. Likely causes: a wrong "
            "prediction target (diffusion.prediction), dose.dose_scale_gy far from the "
            "doses of the data, too high an optim.lr, or too few steps so far.")
    return messages
