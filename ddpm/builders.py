"""Objects built from a resolved config: the UNet, the noise schedule, the z-bin priors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import Config
from .schedule import NoiseSchedule
from .unet import UNet


def build_model(cfg: Config) -> UNet:
    """The UNet that ``cfg.model`` describes; its input channels are ``cfg.input_channels``
    (the data plus the prior, or the dose anatomy plus, unless regressing, the noisy dose)."""
    m = cfg.model
    return UNet(
        dims=m.dims,
        in_channels=cfg.input_channels,
        out_channels=m.out_channels,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_levels=tuple(m.attention_levels),
        num_heads=m.num_heads,
        norm_groups=m.norm_groups,
        dropout=m.dropout,
        num_classes=cfg.num_classes or None,
        use_position=m.conditioning == "position",
        gradient_checkpointing=m.gradient_checkpointing,
        channels_last=m.channels_last,
    )


def build_schedule(cfg: Config) -> NoiseSchedule:
    """The noise schedule of ``cfg.diffusion``."""
    d = cfg.diffusion
    return NoiseSchedule(d.schedule, d.timesteps, zero_terminal_snr=d.zero_terminal_snr)


def load_priors(cache_dir) -> dict:
    """The cache's z-bin priors as tensors: ``head_mask`` and ``image``, each (n_bins, H, W)."""
    with np.load(Path(cache_dir) / "priors.npz") as f:
        return {k: torch.from_numpy(f[k].astype(np.float32)) for k in ("head_mask", "image")}


def prior_channel(priors: dict, z_bins) -> torch.Tensor:
    """The anatomical prior input channel for each z-bin: mean head mask mapped to [-1, 1]."""
    head = torch.as_tensor(priors["head_mask"]).float()  # (n_bins, H, W) in [0, 1]
    return (head[z_bins] * 2 - 1)[:, None]  # (B, 1, H, W)
