"""Image-quality metrics: PSNR, SSIM, Dice, MAE (torch, batched, on the tensors' device).

Shape convention, shared by every function here (``pred`` and ``target`` must match):

* 2-D tensor ``(H, W)``: one image            -> 0-d tensor
* 3-D tensor ``(D, H, W)``: one volume        -> 0-d tensor
* 4-D tensor ``(B, C, H, W)``: a batch of images   -> ``(B,)`` tensor
* 5-D tensor ``(B, C, D, H, W)``: a batch of volumes -> ``(B,)`` tensor

A batched result holds one value per batch element, taken over all its channels and
positions. Everything is computed in float64 whatever the input dtype (bf16 / fp16 inputs
lose nothing beyond their own rounding), and the result is float64. numpy arrays are
accepted too and are converted with ``torch.as_tensor``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# SSIM constants of Wang et al. 2004, "Image quality assessment: from error visibility to
# structural similarity", IEEE TIP 13(4), Sec. III-B and III-C.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _compute_dtype(device: torch.device) -> torch.dtype:
    # Apple's MPS backend has no float64; everywhere else float64 keeps SSIM's
    # E[x^2] - E[x]^2 free of cancellation for data with a large offset (e.g. CT in HU).
    return torch.float32 if device.type == "mps" else torch.float64


def _as_batch(pred, target, fn: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return pred, target as (B, C, *spatial) float tensors and whether the input was batched."""
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(
            f"ddpm.metrics.{fn}: pred shape {tuple(pred.shape)} != target shape "
            f"{tuple(target.shape)}"
        )
    if pred.dim() not in (2, 3, 4, 5):
        raise ValueError(
            f"ddpm.metrics.{fn}: expected a 2-D image (H, W), 3-D volume (D, H, W), or a "
            f"batch (B, C, H, W) / (B, C, D, H, W); got shape {tuple(pred.shape)}"
        )
    batched = pred.dim() in (4, 5)
    if not batched:  # one image / volume -> batch of one, one channel
        pred, target = pred[None, None], target[None, None]
    dtype = _compute_dtype(pred.device)
    return pred.to(dtype), target.to(dtype), batched


def _check_data_range(data_range, fn: str) -> float:
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"ddpm.metrics.{fn}: data_range must be a positive number, got {data_range!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"ddpm.metrics.{fn}: data_range must be a positive finite number (max - min of "
            f"the value range), got {data_range!r}"
        )
    return value


def _finish(per_element: torch.Tensor, batched: bool) -> torch.Tensor:
    return per_element if batched else per_element[0]


def mae(pred, target) -> torch.Tensor:
    """Mean absolute error |pred - target|, per batch element."""
    pred, target, batched = _as_batch(pred, target, "mae")
    return _finish((pred - target).abs().flatten(1).mean(1), batched)


def psnr(pred, target, data_range) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 * log10(data_range^2 / MSE) in dB, per batch element.

    ``data_range`` (max - min of the value range, e.g. 2.0 for images in [-1, 1]) is
    required: guessing it from the data makes numbers incomparable between runs.
    Identical inputs give +inf.
    """
    data_range = _check_data_range(data_range, "psnr")
    pred, target, batched = _as_batch(pred, target, "psnr")
    mse = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    return _finish(10.0 * torch.log10(data_range**2 / mse), batched)


def gaussian_kernel_1d(size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian window of ``size`` taps (the SSIM window is its outer product)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding: (N, 1, *S) -> (N, 1, *(S - size + 1)).

    Keeping only the valid window positions is what scikit-image does by cropping
    (size - 1) // 2 voxels from each border after filtering, so the mean is unaffected by
    any border handling.
    """
    spatial = x.dim() - 2
    conv = F.conv2d if spatial == 2 else F.conv3d
    for axis in range(spatial):
        shape = [1, 1] + [1] * spatial
        shape[2 + axis] = kernel.numel()
        x = conv(x, kernel.view(shape))
    return x


def ssim(pred, target, data_range) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13), mean over valid window positions.

    Gaussian window of 11 taps with sigma 1.5, K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2,
    C2 = (K2 L)^2 with L = ``data_range``; local statistics are Gaussian-weighted means with
    population (not sample) covariance, as in the paper. This equals scikit-image's
    ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)``. 2-D images and 3-D volumes; every
    spatial size must be at least 11. Batched inputs average over channels and positions.
    """
    data_range = _check_data_range(data_range, "ssim")
    pred, target, batched = _as_batch(pred, target, "ssim")
    spatial_shape = tuple(pred.shape[2:])
    if min(spatial_shape) < SSIM_WINDOW:
        raise ValueError(
            f"ddpm.metrics.ssim: every spatial size must be >= {SSIM_WINDOW} (the Gaussian "
            f"window); got spatial shape {spatial_shape}"
        )
    b, c = pred.shape[:2]
    kernel = gaussian_kernel_1d(SSIM_WINDOW, SSIM_SIGMA, pred.dtype, pred.device)

    x = pred.reshape(b * c, 1, *spatial_shape)
    y = target.reshape(b * c, 1, *spatial_shape)
    # Filter the five maps in one call: (5 * B * C, 1, *S).
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y]), kernel)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )  # (B * C, 1, *valid)
    return _finish(ssim_map.reshape(b, -1).mean(1), batched)


def dice(pred, target, threshold: float = 0.5) -> torch.Tensor:
    """Dice coefficient 2 |A & B| / (|A| + |B|) of binary masks, per batch element.

    Boolean inputs are used as they are; any other dtype is binarised as ``x > threshold``
    (so {0, 1} masks are exact with the default 0.5; pass ``threshold=0.0`` for masks
    generated in [-1, 1]). Two empty masks agree perfectly: Dice 1.0.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    pred = pred if pred.dtype == torch.bool else pred > threshold
    target = target if target.dtype == torch.bool else target > threshold
    pred, target, batched = _as_batch(pred, target, "dice")  # bool -> float {0, 1}
    intersection = (pred * target).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    both_empty = total == 0
    score = torch.where(both_empty, torch.ones_like(total), 2 * intersection / total.clamp_min(1))
    return _finish(score, batched)
