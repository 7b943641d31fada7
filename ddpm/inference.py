"""Sliding-window inference with Gaussian-weighted blending of overlapping windows.

A network trained on patches is applied to a whole volume window by window; where windows
overlap, their outputs are averaged with weights that fall off from each window's centre
(a Gaussian with sigma = ``sigma_scale`` x window size per axis, 1/8 by default, as in
nnU-Net: Isensee et al. 2021, "nnU-Net", Nature Methods 18, Methods section "Inference").
Voxels near a window's border see a truncated receptive field (zero padding inside the
network), so down-weighting them removes most of the seams a plain average would show.

Windows are placed per axis so that they cover the volume, consecutive windows overlap by
at least ``overlap`` x window and the last window is flush with the far border. The same
placement and weights serve every call on a volume of the same shape, which matters when
every step of a diffusion or flow sampler is evaluated window by window:
:class:`SlidingWindow` precomputes the weight map once and caches the normaliser per
volume shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def axis_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size``.

    n = ceil((size - window) / (window (1 - overlap))) + 1 windows, spread evenly from 0 to
    size - window, so adjacent windows overlap by at least ``overlap`` x window. An axis not
    longer than the window holds one window at 0 (the volume is padded to the window).
    """
    if size <= window:
        return [0]
    target_step = window * (1.0 - overlap)
    n = math.ceil((size - window) / target_step) + 1
    step = (size - window) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def window_positions(spatial: Sequence[int], window: Sequence[int], overlap: float = 0.5
                     ) -> list[tuple[int, ...]]:
    """Start corners of all windows covering a volume of size ``spatial`` (2D or 3D)."""
    _check_window(spatial, window, overlap)
    per_axis = [axis_starts(int(s), int(w), overlap)
                for s, w in zip(spatial, window, strict=True)]
    return list(itertools.product(*per_axis))


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map (*window,) float32: a separable Gaussian centred on the window centre.

    sigma = sigma_scale x window size per axis; normalised to a maximum of 1. Its smallest
    value (at the corners) is exp(-d / (8 sigma_scale^2)) for d dimensions, 3.4e-4 per axis
    at the default 1/8: small, but never zero, so every covered voxel gets a weight.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones(())
    for w in window:
        coords = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
        profile = torch.exp(-0.5 * (coords / (sigma_scale * w)) ** 2)
        weights = weights[..., None] * (profile / profile.max())
    return weights.float()


def _check_window(spatial, window, overlap) -> None:
    if len(spatial) != len(window) or len(window) not in (2, 3):
        raise ValueError(f"window {tuple(window)} must have one size per spatial axis of the "
                         f"volume {tuple(spatial)} (2D or 3D)")
    if any(int(w) < 1 for w in window):
        raise ValueError(f"window sizes must be >= 1, got {tuple(window)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


class SlidingWindow:
    """Reusable sliding-window evaluator: ``SlidingWindow(window)(fn, x)``.

    ``fn`` maps windows (N, C, *window) to (N, C_out, *window); ``x`` is (B, C, *spatial)
    with 2 or 3 spatial axes. Each call of ``fn`` gets the windows at up to ``batch_size``
    positions, stacked position-major: N = k * B, item j belongs to volume j % B. Per-volume
    arguments (e.g. diffusion timesteps (B,)) passed as ``batch_args`` are repeated the same
    way and handed to ``fn`` after the windows: ``fn(windows, *batch_args)``.

    Axes shorter than the window are padded on both sides (half before, the rest after) to
    the window size with the constant ``pad_value`` (one value, or one per input channel:
    e.g. -1 for a CT/mask channel in [-1, 1]); the output is cropped back to ``spatial``.
    """

    def __init__(self, window: Sequence[int], overlap: float = 0.5, sigma_scale: float = 0.125,
                 batch_size: int = 1, progress: bool = False,
                 pad_value: float | Sequence[float] = 0.0):
        self.window = tuple(int(w) for w in window)
        _check_window(self.window, self.window, overlap)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.overlap, self.sigma_scale = float(overlap), float(sigma_scale)
        self.batch_size, self.progress, self.pad_value = int(batch_size), progress, pad_value
        self.weights = gaussian_weights(self.window, self.sigma_scale)  # (*window,)
        self._weights_on: dict[str, torch.Tensor] = {}  # device -> weights
        self._normalisers: dict[tuple, torch.Tensor] = {}  # (spatial, device) -> weight sum

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """x padded to at least the window on every axis, and the (before, after) pads."""
        pads = []
        for s, w in zip(x.shape[2:], self.window, strict=True):
            total = max(w - s, 0)
            pads.append((total // 2, total - total // 2))
        if not any(a or b for a, b in pads):
            return x, pads
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
        values = torch.as_tensor(self.pad_value, dtype=x.dtype, device=x.device).flatten()
        if values.numel() == 1:
            return F.pad(x, flat, value=float(values)), pads
        if values.numel() != x.shape[1]:
            raise ValueError(f"pad_value holds {values.numel()} values for {x.shape[1]} input "
                             "channels: give one value, or one per channel")
        padded = F.pad(x - values.reshape(1, -1, *[1] * (x.ndim - 2)), flat, value=0.0)
        return padded + values.reshape(1, -1, *[1] * (x.ndim - 2)), pads

    def _weights(self, device) -> torch.Tensor:
        if str(device) not in self._weights_on:
            self._weights_on[str(device)] = self.weights.to(device)
        return self._weights_on[str(device)]

    def _normaliser(self, spatial: tuple, positions, device) -> torch.Tensor:
        """Sum of the window weights over every voxel of a volume of size ``spatial``."""
        key = (spatial, str(device))
        if key not in self._normalisers:
            total = torch.zeros(spatial, dtype=torch.float32, device=device)
            weights = self._weights(device)
            for start in positions:
                total[self._region(start)] += weights
            self._normalisers[key] = total
        return self._normalisers[key]

    def _region(self, start) -> tuple[slice, ...]:
        return tuple(slice(a, a + w) for a, w in zip(start, self.window, strict=True))

    def __call__(self, fn: Callable[..., torch.Tensor], x: torch.Tensor,
                 batch_args: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Blend ``fn`` over ``x`` (B, C, *spatial); returns (B, C_out, *spatial)."""
        if x.ndim != len(self.window) + 2:
            raise ValueError(f"x must be (B, C, *spatial) with {len(self.window)} spatial axes "
                             f"for window {self.window}, got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        x, pads = self._pad(x)
        padded = tuple(x.shape[2:])
        positions = window_positions(padded, self.window, self.overlap)
        weights = self._weights(x.device)
        batch = x.shape[0]
        out = None
        chunks = range(0, len(positions), self.batch_size)
        for first in tqdm(chunks, desc="sliding window", leave=False, disable=not self.progress):
            chunk = positions[first:first + self.batch_size]
            windows = torch.cat([x[(slice(None), slice(None)) + self._region(p)] for p in chunk])
            args = [a.repeat(len(chunk), *[1] * (a.ndim - 1)) for a in batch_args]
            result = fn(windows, *args)  # (len(chunk) * B, C_out, *window)
            if result.shape[0] != windows.shape[0] or tuple(result.shape[2:]) != self.window:
                raise ValueError(f"fn returned shape {tuple(result.shape)} for windows of shape "
                                 f"{tuple(windows.shape)}: expected (N, C_out, *{self.window})")
            if out is None:
                dtype = torch.promote_types(result.dtype, torch.float32)
                out = torch.zeros((batch, result.shape[1]) + padded, dtype=dtype,
                                  device=x.device)
            for k, p in enumerate(chunk):
                out[(slice(None), slice(None)) + self._region(p)] += (
                    result[k * batch:(k + 1) * batch].to(out.dtype) * weights)
        out = out / self._normaliser(padded, positions, x.device).to(out.dtype)
        crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
        return out[(slice(None), slice(None)) + crop]


def windowed(evaluator: SlidingWindow, fn: Callable[..., torch.Tensor],
             extra_channels: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """Turn a per-window ``fn(windows, *per_sample)`` into a whole-volume ``f(x, *per_sample)``.

    ``f`` concatenates ``extra_channels`` (B, C_cond, *spatial), e.g. the anatomy, after ``x``
    and blends ``fn`` over the result with ``evaluator``. So a sampler's denoiser
    ``denoiser(x_t, t)`` can run window by window at every step:
    ``windowed(SlidingWindow(window), lambda w, t: model(w, t), anatomy)``.
    """

    def f(x: torch.Tensor, *per_sample: torch.Tensor) -> torch.Tensor:
        x_in = x if extra_channels is None else torch.cat([x, extra_channels], dim=1)
        return evaluator(fn, x_in, per_sample)

    return f


def sliding_window(fn: Callable[..., torch.Tensor], x: torch.Tensor, window: Sequence[int],
                   overlap: float = 0.5, sigma_scale: float = 0.125, batch_size: int = 1,
                   progress: bool = False, pad_value: float | Sequence[float] = 0.0,
                   batch_args: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """One-off :class:`SlidingWindow` call: blend ``fn`` over ``x`` (B, C, *spatial).

    For repeated calls (every step of a sampler) build one ``SlidingWindow`` and reuse it.
    """
    evaluator = SlidingWindow(window, overlap, sigma_scale, batch_size, progress, pad_value)
    return evaluator(fn, x, batch_args)
