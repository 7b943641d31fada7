"""Pictures people look at: sample grids (image with its mask overlaid) and metric curves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path) -> Path:
    """Save ``fig`` as PNG atomically (temp file then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def sample_grid(samples, row_labels, path, title: str | None = None) -> Path:
    """Grid of generated slices, one row per condition, lesion mask outlined in red.

    ``samples`` (rows, cols, 2, H, W) in [-1, 1]: channel 0 the image, channel 1 the mask
    (lesion where > 0). ``row_labels`` one string per row.
    """
    samples = np.asarray(samples, dtype=np.float32)
    rows, cols = samples.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.2, 1.6 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image, mask = samples[r, c, 0], samples[r, c, 1]
            # RAS arrays are (x, y): transpose and flip so anterior is up, as radiologists view
            ax.imshow(np.flipud(image.T), cmap="gray", vmin=-1, vmax=1)
            if (mask > 0).any():
                ax.contour(np.flipud(mask.T > 0), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def metric_curves(rows: list[dict], keys: list[str], path, x: str = "step", title=None) -> Path:
    """Line plot of ``keys`` from ``rows`` (e.g. performance.csv rows) against ``x``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [float(r[x]) for r in rows]
    for key in keys:
        ys = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]
        ax.plot(xs, ys, marker="o", ms=3, label=key)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
