"""Training losses: the per-channel diffusion loss of JS-DDPM and the regression losses.

Why per channel: the image and the lesion mask are learnt together in one (B, 2, H, W)
tensor, but their errors live on different scales (a mask is mostly one value). One MSE over
the stacked tensor lets the larger error drown the other; here each channel's MSE is
normalised by its own element count and the channel losses are then weighted and summed.
"""

from __future__ import annotations

import torch
from torch import nn


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy", Eq. 7 and Sec. 3.4).

    The x0-loss weight min(SNR, gamma), rewritten for the target the network predicts:
    eps: min(SNR, gamma) / SNR; x0: min(SNR, gamma); v: min(SNR, gamma) / (SNR + 1).
    """
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 where SNR = 0
    if prediction == "x0":
        return snr.clamp(max=gamma)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1.0)
    raise ValueError(f"unknown prediction {prediction!r}")


def lesion_weight_map(lesion: torch.Tensor, weight: float) -> torch.Tensor:
    """Pixel weights: 1 outside the lesion, ``weight`` inside; ``lesion`` (B, 1, *spatial) bool."""
    return 1.0 + (weight - 1.0) * lesion.float()


class DiffusionLoss(nn.Module):
    """Per-channel diffusion loss with optional lesion, uncertainty and min-SNR weighting.

    For channel c: L_c = sum_b w_b sum_p m_bp (pred - target)^2 / sum_b sum_p m_bp, with pixel
    weights m (1, or ``lesion_weight`` inside the lesion; dividing by their sum keeps the loss
    scale when lesions come and go) and per-sample min-SNR weights w_b (1 when off).
    Total: sum_c lambda_c L_c, or with uncertainty weighting (Kendall et al. 2018, Eq. 7, with
    s_c = log sigma_c^2 learnt): sum_c 0.5 exp(-s_c) lambda_c L_c + 0.5 s_c.
    """

    def __init__(
        self,
        channel_names=("image", "mask"),
        channel_weights=(1.0, 1.0),
        lesion_weight: float = 1.0,
        uncertainty_weighting: bool = False,
        min_snr_gamma: float | None = None,
        prediction: str = "eps",
    ):
        super().__init__()
        if len(channel_names) != len(channel_weights):
            raise ValueError(
                f"{len(channel_weights)} channel weights for {len(channel_names)} channels "
                f"{tuple(channel_names)}"
            )
        self.channel_names = tuple(channel_names)
        self.register_buffer("channel_weights", torch.tensor(channel_weights, dtype=torch.float32))
        self.lesion_weight = lesion_weight
        self.min_snr_gamma = min_snr_gamma
        self.prediction = prediction
        self.log_variances = (
            nn.Parameter(torch.zeros(len(channel_names))) if uncertainty_weighting else None
        )

    def per_channel(self, pred, target, lesion=None, snr=None) -> torch.Tensor:
        """The loss of each channel, each normalised by its own (weighted) element count. (C,)"""
        err = (pred.float() - target.float()) ** 2  # (B, C, *spatial)
        reduce_dims = [0] + list(range(2, err.ndim))
        if lesion is not None and self.lesion_weight != 1.0:
            pixel_w = lesion_weight_map(lesion, self.lesion_weight).expand_as(err)
        else:
            pixel_w = None
        if snr is not None and self.min_snr_gamma is not None:
            sample_w = min_snr_weight(snr.float(), self.min_snr_gamma, self.prediction)
            sample_w = sample_w.view(-1, *([1] * (err.ndim - 1)))
            err = err * sample_w
        if pixel_w is None:
            return err.mean(dim=reduce_dims)
        return (err * pixel_w).sum(dim=reduce_dims) / pixel_w.sum(dim=reduce_dims)

    def forward(self, pred, target, lesion=None, snr=None):
        """(total, parts): ``parts`` holds each channel's loss and, if learnt, its log-variance."""
        losses = self.per_channel(pred, target, lesion, snr)
        weighted = self.channel_weights * losses
        if self.log_variances is None:
            total = weighted.sum()
        else:
            s = self.log_variances
            total = (0.5 * torch.exp(-s) * weighted + 0.5 * s).sum()
        parts = {f"loss_{name}": losses[i].detach() for i, name in enumerate(self.channel_names)}
        if self.log_variances is not None:
            for i, name in enumerate(self.channel_names):
                parts[f"logvar_{name}"] = self.log_variances[i].detach()
        return total, parts


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of finite-difference gradients along every spatial axis.

    A sharpness term for regression (e.g. dose prediction); 2D and 3D.
    """
    total = pred.new_zeros(())
    for dim in range(2, pred.ndim):
        total = total + (torch.diff(pred, dim=dim) - torch.diff(target, dim=dim)).abs().mean()
    return total / (pred.ndim - 2)


def regression_loss(pred, target, kind: str = "l1", gradient_weight: float = 0.0):
    """Direct-regression loss: L1 or MSE, plus ``gradient_weight`` times :func:`gradient_loss`."""
    if kind == "l1":
        main = (pred - target).abs().mean()
    elif kind == "mse":
        main = ((pred - target) ** 2).mean()
    else:
        raise ValueError(f"unknown regression loss {kind!r}; expected 'l1' or 'mse'")
    parts = {f"loss_{kind}": main.detach()}
    if gradient_weight:
        grad = gradient_loss(pred, target)
        parts["loss_gradient"] = grad.detach()
        main = main + gradient_weight * grad
    return main, parts
