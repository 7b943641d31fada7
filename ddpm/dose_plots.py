"""Pictures of the dose workload: dose slices side by side, and the ablation curves."""

from __future__ import annotations

import numpy as np

from .viz import plt, save_figure


def _axial(volume, k: int) -> np.ndarray:
    """Axial slice k of an (X, Y, Z) RAS volume, anterior up (as radiologists view it)."""
    return np.flipud(np.asarray(volume, dtype=np.float32)[:, :, k].T)


def dose_panels(ct, reference_gy, predictions: dict, path, title: str = "",
                vmax: float | None = None):
    """One axial slice (the one with the most planned dose): CT, planned dose, then each
    prediction and its error. ``ct`` (X, Y, Z) in model space, doses (X, Y, Z) in Gy;
    ``predictions`` maps a label to a dose volume."""
    reference = np.asarray(reference_gy, dtype=np.float32)
    k = int(reference.sum(axis=(0, 1)).argmax())
    vmax = float(reference.max()) if vmax is None else vmax
    cols = 2 + 2 * len(predictions)
    fig, axes = plt.subplots(1, cols, figsize=(2.2 * cols, 2.6), squeeze=False)
    panels = [("CT", _axial(ct, k), dict(cmap="gray", vmin=-1, vmax=1)),
              ("plan (Gy)", _axial(reference, k), dict(cmap="jet", vmin=0, vmax=vmax))]
    for label, dose in predictions.items():
        dose = np.asarray(dose, dtype=np.float32)
        panels.append((f"{label} (Gy)", _axial(dose, k), dict(cmap="jet", vmin=0, vmax=vmax)))
        panels.append((f"{label} - plan", _axial(dose - reference, k),
                       dict(cmap="RdBu_r", vmin=-vmax / 4, vmax=vmax / 4)))
    for ax, (label, image, style) in zip(axes[0], panels):
        shown = ax.imshow(image, **style)
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if label != "CT":
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(f"{title} (axial slice {k})" if title else f"axial slice {k}", fontsize=8)
    return save_figure(fig, path)


def ablation_plot(rows: list[dict], x: str, path, title: str, log_x: bool = False,
                  references: dict[str, float] | None = None):
    """MAE (Gy, left axis) and per-voxel sample std (Gy, right axis) against ``x``, one line
    per model; ``rows`` are ablation table rows with keys model, ``x``, mae_gy, std_gy.
    ``references`` maps a label to an MAE drawn as a horizontal line (e.g. regression)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, (label, mae) in enumerate((references or {}).items()):
        ax.axhline(mae, color="0.4", ls=":" if k else "-.", lw=1, label=f"{label} MAE")
    ax_std = ax.twinx()
    for k, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r[x])
        xs = [r[x] for r in mine]
        color = f"C{k}"
        ax.plot(xs, [r["mae_gy"] for r in mine], marker="o", color=color, label=f"{model} MAE")
        ax_std.plot(xs, [r["std_gy"] for r in mine], marker="s", ls="--", color=color,
                    alpha=0.7, label=f"{model} std")
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0)  # differences read against the whole error, not a zoomed axis
    ax_std.set_ylim(bottom=0)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("MAE in the body (Gy)")
    ax_std.set_ylabel("per-voxel sample std (Gy, dashed)")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = ax_std.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
