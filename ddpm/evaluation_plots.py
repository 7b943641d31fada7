"""The PNGs of ``evaluate.py``: reconstruction vs t, lesion histograms, accuracies, samples."""

from __future__ import annotations

import math

import numpy as np

from .generation import condition_label
from .viz import plt, sample_grid, save_figure


def reconstruction_curves(recon: dict, path):
    """PSNR and SSIM of the one-step x0 reconstruction against t, live vs EMA weights."""
    ts = recon["timesteps"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, unit in ((axes[0], "psnr", " (dB)"), (axes[1], "ssim", "")):
        for which, style in (("live", "o-"), ("ema", "s--")):
            ax.plot(ts, [recon[which][f"{metric}_t{t}"] for t in ts], style, ms=4,
                    label=f"{which} weights")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(metric.upper() + unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"one-step x0 reconstruction ({recon['n_slices']} slices)", fontsize=9)
    return save_figure(fig, path)


def lesion_histograms(real: dict, generated: dict, path):
    """Histograms of lesion area (pixels) and lesion contrast, real vs generated."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, xlabel in ((axes[0], "area", "lesion area (pixels)"),
                            (axes[1], "contrast", "lesion contrast (inside - ring)")):
        both = np.concatenate([real[key], generated[key]])
        bins = np.histogram_bin_edges(both, bins=20) if both.size else 10
        for name, values, colour in (("real", real[key], "tab:blue"),
                                     ("generated", generated[key], "tab:orange")):
            if len(values):
                ax.hist(values, bins=bins, alpha=0.55, density=True, color=colour,
                        label=f"{name} (n={len(values)})")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lesions of real and generated lesion slices", fontsize=9)
    return save_figure(fig, path)


def accuracy_bars(faithfulness: dict, path):
    """Classifier accuracy on real vs generated slices: z-bin exact, within one bin, lesion."""
    keys = ("z_exact", "z_within1", "lesion")
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for k, (name, colour) in enumerate((("real", "tab:blue"), ("generated", "tab:orange"))):
        values = [faithfulness[name][key] for key in keys]
        values = [0.0 if v is None or math.isnan(v) else v for v in values]
        ax.bar(x + (k - 0.5) * 0.38, values, width=0.38, color=colour,
               label=f"{name} (n={faithfulness[name]['n']})")
    ax.set_xticks(x, ["z-bin exact", "z-bin within 1", "lesion presence"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("classifier accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def condition_grid(gen: dict, path, per_row: int = 4):
    """Up to ``per_row`` generated slices of each condition, one row per condition."""
    rows, labels = [], []
    for b, p in dict.fromkeys(zip(gen["z_bin"].tolist(), gen["pathology"].tolist())):
        pick = ((gen["z_bin"] == b) & (gen["pathology"] == p)).nonzero().flatten()[:per_row]
        if len(pick) < per_row:
            continue
        rows.append(gen["x"][pick].numpy())
        labels.append(condition_label(b, p))
    if rows:
        return sample_grid(np.stack(rows), labels, path, title="generated (evaluation set)")
    return None
