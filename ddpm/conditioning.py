"""Conditioning: where a slice sits (z-bins), whether it holds a lesion, and the embeddings.

JS-DDPM conditions every 2D slice on one *class token* that combines its position in the
brain with its pathology: ``token = z_bin + pathology * n_bins``. The z-bins are LOCAL: they
divide the z-range actually used for training, not the whole volume, so that every bin (and
so every token) receives training slices.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _check_z_range(z_range: tuple[int, int], n_bins: int) -> tuple[int, int]:
    lo, hi = (int(v) for v in z_range)
    if hi < lo:
        raise ValueError(
            f"z_range {tuple(z_range)} is empty: expected (low, high) with low <= high"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if hi - lo + 1 < n_bins:
        raise ValueError(
            f"z_range {tuple(z_range)} holds {hi - lo + 1} slices, fewer than n_bins={n_bins}: "
            "some bins would never be used"
        )
    return lo, hi


def quantize_z_local(z: int, z_range: tuple[int, int], n_bins: int) -> int:
    """Bin index of slice ``z`` within the inclusive ``z_range``, split into ``n_bins`` bins.

    bin = floor((z - low) * n_bins / n), with n = high - low + 1 slices. Every bin is used,
    bin sizes are floor(n / n_bins) or ceil(n / n_bins), and the bin is monotone in z.
    A z outside the range is a ``ValueError`` (it has no bin; it should not be in the cache).
    """
    lo, hi = _check_z_range(z_range, n_bins)
    z = int(z)
    if not lo <= z <= hi:
        raise ValueError(f"z={z} lies outside z_range [{lo}, {hi}]")
    return (z - lo) * n_bins // (hi - lo + 1)


def quantize_z_local_tensor(z: torch.Tensor, z_range: tuple[int, int], n_bins: int) -> torch.Tensor:
    """Tensor version of :func:`quantize_z_local` for an integer tensor of slice indices."""
    lo, hi = _check_z_range(z_range, n_bins)
    z = torch.as_tensor(z, dtype=torch.long)
    if z.numel() and (z.min() < lo or z.max() > hi):
        raise ValueError(f"z values [{int(z.min())}, {int(z.max())}] leave z_range [{lo}, {hi}]")
    return torch.div((z - lo) * n_bins, hi - lo + 1, rounding_mode="floor")


def z_position(z, z_range: tuple[int, int]):
    """Continuous position of ``z`` in the z-range, 0 at the low end and 1 at the high end."""
    lo, hi = (int(v) for v in z_range)
    return (z - lo) / max(hi - lo, 1)


def class_token(z_bin, pathology, n_bins: int):
    """Class token ``z_bin + pathology * n_bins`` (ints or tensors); tokens 0..2*n_bins-1."""
    if not isinstance(z_bin, torch.Tensor):
        if not 0 <= int(z_bin) < n_bins:
            raise ValueError(f"z_bin={z_bin} outside [0, {n_bins - 1}]")
        if int(pathology) not in (0, 1):
            raise ValueError(f"pathology must be 0 or 1, got {pathology}")
    return z_bin + pathology * n_bins


def split_token(token, n_bins: int):
    """Inverse of :func:`class_token`: ``token -> (z_bin, pathology)``."""
    return token % n_bins, token // n_bins


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars ``x`` (B,) -> (B, dim).

    The transformer position encoding (Vaswani et al. 2017, Sec. 3.5) used for diffusion
    timesteps by Ho et al. 2020: frequencies ``max_period ** (-i / half)``; cos then sin.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    )
    args = x.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TokenEmbedding(nn.Module):
    """Learned table of ``num_classes`` class tokens plus one *null* token.

    The null token (index ``num_classes``, or any negative token) stands for "no condition";
    training with it now and then enables classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_token(self) -> int:
        return self.num_classes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        tokens = torch.where(tokens < 0, torch.full_like(tokens, self.num_classes), tokens)
        return self.table(tokens)


class PositionEmbedding(nn.Module):
    """Continuous z position in [0, 1] -> sinusoidal features -> MLP (the JS-DDPM z variant).

    Unlike a table of bins, nearby positions get nearby embeddings, and no bin goes untrained.
    """

    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        self.dim, self.scale = dim, scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, position: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        return self.mlp(sinusoidal_embedding(position * self.scale, self.dim))


def model_conditions(mode: str, n_bins: int, z_bin, pathology, position=None) -> dict:
    """Keyword arguments for ``UNet.forward`` from a slice's z-bin, pathology and position.

    ``token``: one class token per (z-bin, pathology). ``position``: the pathology as a token
    (0/1) and the continuous z position in [0, 1]; without a known position the bin's centre,
    ``(z_bin + 0.5) / n_bins``, stands in. ``none``: unconditional.
    """
    if mode == "token":
        return {"token": class_token(z_bin, pathology, n_bins)}
    if mode == "position":
        if position is None:
            position = (z_bin + 0.5) / n_bins
        return {"token": pathology, "position": position}
    if mode == "none":
        return {}
    raise ValueError(f"unknown conditioning {mode!r}; expected 'token', 'position' or 'none'")
