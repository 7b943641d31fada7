"""Radiotherapy dose metrics: DVH points, OpenKBP dose / DVH scores, gamma pass rate.

Doses are in Gy on a regular grid; arrays are numpy or torch, ``(D, H, W)`` volumes (gamma
also takes ``(H, W)`` planes), with ``spacing_mm`` giving the voxel size per axis in the
same axis order. Doses are handled in float64 on the device of the reference tensor (the
gamma search compares normalised dose differences in float32, ample for a pass / fail at 1).

References:
  Babier et al. 2021, "OpenKBP: The open-access knowledge-based planning grand challenge
  and dataset", Med. Phys. 48(9) -- dose score, DVH score and DVH point conventions.
  Low et al. 1998, "A technique for the quantitative evaluation of dose distributions",
  Med. Phys. 25(5) -- the gamma index (Eq. 7).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

CC_IN_MM3 = 1000.0
D01CC_VOLUME_MM3 = 0.1 * CC_IN_MM3
_SEARCH_DTYPE = torch.float32


def _as_dose(x, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device).to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"ddpm.dose: {name} contains NaN or inf values")
    return t


def _as_spacing(spacing_mm, ndim: int) -> tuple[float, ...]:
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except TypeError:
        spacing = ()
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"ddpm.dose: spacing_mm must hold {ndim} positive voxel sizes in mm (one per "
            f"axis), got {spacing_mm!r}"
        )
    return spacing


def _as_mask(mask, shape: torch.Size, name: str, device) -> torch.Tensor:
    m = torch.as_tensor(mask, device=device)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(
            f"ddpm.dose: mask {name!r} has shape {tuple(m.shape)}, expected the dose shape "
            f"{tuple(shape)}"
        )
    if m.dtype != torch.bool:
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(f"ddpm.dose: mask {name!r} must be boolean or hold only 0 and 1")
        m = m != 0
    return m


def _percentile_sorted(sorted_values: torch.Tensor, q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics.

    The value at fractional rank q/100 * (n - 1) in the sorted sample: numpy's default
    ``np.percentile`` method, which the OpenKBP evaluation uses.
    """
    n = sorted_values.numel()
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + frac * (sorted_values[hi] - sorted_values[lo]))


def dvh_metrics(dose, structures: Mapping[str, object], spacing_mm) -> dict[str, dict[str, float]]:
    """DVH points in Gy per structure: PTVs get D1, D95, D99; other structures Dmean, D0.1cc.

    ``structures`` maps a name to a boolean mask of the dose shape; names starting with
    "PTV" are targets. Dx, the minimum dose to the hottest x % of the structure, is the
    (100 - x)-th percentile of the doses of its voxels with linear interpolation between
    order statistics (numpy's default), the OpenKBP convention (Babier et al. 2021), so
    values are comparable with the challenge's. D0.1cc follows the same convention: with
    n = max(1, round(100 mm^3 / voxel volume)) voxels in 0.1 cc and N voxels in the
    structure, it is the (100 - 100 n / N)-th percentile. A structure smaller than 0.1 cc
    lies wholly inside its hottest 0.1 cc, so its D0.1cc is its minimum dose (percentile
    clamped at 0). An empty mask is an error: leave absent structures out of the dict.
    """
    dose = _as_dose(dose, "dose")
    spacing = _as_spacing(spacing_mm, dose.dim())
    voxel_volume_mm3 = math.prod(spacing)
    voxels_in_01cc = max(1, round(D01CC_VOLUME_MM3 / voxel_volume_mm3))

    metrics: dict[str, dict[str, float]] = {}
    for name, mask in structures.items():
        inside = dose[_as_mask(mask, dose.shape, name, dose.device)]
        if inside.numel() == 0:
            raise ValueError(
                f"ddpm.dose.dvh_metrics: structure {name!r} is empty (no voxel in its mask); "
                "leave absent structures out"
            )
        doses = torch.sort(inside).values
        if name.startswith("PTV"):
            metrics[name] = {
                "D1": _percentile_sorted(doses, 99.0),
                "D95": _percentile_sorted(doses, 5.0),
                "D99": _percentile_sorted(doses, 1.0),
            }
        else:
            q = max(0.0, 100.0 - 100.0 * voxels_in_01cc / doses.numel())
            metrics[name] = {
                "Dmean": float(doses.mean()),
                "D0.1cc": _percentile_sorted(doses, q),
            }
    return metrics


def dose_score(pred, reference, body_mask) -> float:
    """OpenKBP dose score: mean absolute dose error in Gy over the voxels inside the body."""
    reference = _as_dose(reference, "reference")
    pred = _as_dose(pred, "pred", device=reference.device)
    if pred.shape != reference.shape:
        raise ValueError(
            f"ddpm.dose.dose_score: pred shape {tuple(pred.shape)} != reference shape "
            f"{tuple(reference.shape)}"
        )
    body = _as_mask(body_mask, reference.shape, "body_mask", reference.device)
    if not body.any():
        raise ValueError("ddpm.dose.dose_score: body_mask is empty")
    return float((pred[body] - reference[body]).abs().mean())


def dvh_score(pred_metrics: Mapping, ref_metrics: Mapping) -> float:
    """OpenKBP DVH score: mean |pred - reference| in Gy over every DVH point of every structure.

    Both arguments are ``dvh_metrics`` outputs and must hold the same structures and points.
    """
    if set(pred_metrics) != set(ref_metrics):
        raise ValueError(
            "ddpm.dose.dvh_score: structures differ: only in pred "
            f"{sorted(set(pred_metrics) - set(ref_metrics))}, only in reference "
            f"{sorted(set(ref_metrics) - set(pred_metrics))}"
        )
    differences = []
    for name, ref_points in ref_metrics.items():
        if set(pred_metrics[name]) != set(ref_points):
            raise ValueError(
                f"ddpm.dose.dvh_score: structure {name!r} has points "
                f"{sorted(pred_metrics[name])} in pred but {sorted(ref_points)} in reference"
            )
        differences += [abs(pred_metrics[name][k] - v) for k, v in ref_points.items()]
    if not differences:
        raise ValueError("ddpm.dose.dvh_score: no DVH points to compare")
    return sum(differences) / len(differences)


# ---------------------------------------------------------------------------------------
# Gamma index
# ---------------------------------------------------------------------------------------


def _box_max(x: torch.Tensor, half_widths: Sequence[int]) -> torch.Tensor:
    """Maximum over the box of +-half_widths voxels around every voxel (inside the grid)."""
    for axis, m in enumerate(half_widths):
        if m == 0:
            continue
        moved = x.movedim(axis, -1)
        pooled = F.max_pool1d(
            moved.reshape(-1, 1, moved.shape[-1]), kernel_size=2 * m + 1, stride=1, padding=m
        )
        x = pooled.reshape(moved.shape).movedim(-1, axis)
    return x


def _search_cells(spacing, distance_mm, max_step_mm):
    """Sub-voxel search lattice, grouped by the voxel cell each point falls in.

    Along axis a the lattice step is spacing[a] / k[a] with k[a] the smallest integer that
    makes the step <= max_step_mm, so whole-voxel offsets are lattice points and every
    point splits exactly into an integer cell index and a fraction j / k[a]. Returns
    (k, reach, cells): reach[a] the furthest lattice index, and cells a list of
    (cell index per axis, squared distance in mm^2 of the cell's nearest lattice point),
    nearest first, covering every lattice point within distance_mm.
    """
    k = [max(1, math.ceil(s / max_step_mm - 1e-9)) for s in spacing]
    reach = [math.floor(distance_mm * ki / s + 1e-9) for s, ki in zip(spacing, k, strict=True)]
    cell_ranges = [range(-math.ceil(r / ki), r // ki + 1) for r, ki in zip(reach, k, strict=True)]
    cells = []
    for cell in itertools.product(*cell_ranges):
        # Nearest lattice point n + j / k (0 <= j < k) of the cell to the origin, per axis.
        near2 = sum(((n if n >= 0 else -n - (ki - 1) / ki) * s) ** 2
                    for n, s, ki in zip(cell, spacing, k, strict=True))
        if near2 <= distance_mm**2 * (1 + 1e-9):
            cells.append((cell, near2))
    cells.sort(key=lambda c: c[1])
    return k, reach, cells


def gamma_pass_rate(
    evaluated,
    reference,
    spacing_mm,
    dose_percent: float = 3.0,
    distance_mm: float = 3.0,
    cutoff_percent: float = 10.0,
    local: bool = False,
    *,
    max_step_mm: float | None = None,
) -> float:
    """Percentage (0..100) of reference voxels with gamma <= 1 (Low et al. 1998, Eq. 7).

    For a reference voxel r, gamma(r) = min over evaluated points r' of
    sqrt(|r' - r|^2 / DTA^2 + (De(r') - Dr(r))^2 / dD^2), with DTA = ``distance_mm`` and
    dD = ``dose_percent`` % of the reference maximum (global) or of Dr(r) (``local``).
    Voxels with Dr below ``cutoff_percent`` % of the reference maximum are not counted
    (in local mode zero-dose voxels are not counted either: their tolerance would be 0).

    The evaluated dose is sampled by bilinear / trilinear interpolation on a lattice of
    offsets out to DTA (a point further away cannot give gamma <= 1). Along axis a the
    step is spacing[a] / ceil(spacing[a] / ``max_step_mm``) (default max step DTA / 10),
    so the lattice is aligned with the voxel grid and whole-voxel shifts are on it.
    A lattice can only overestimate gamma, by an amount that grows with the dose gradient
    and the step. Points outside the evaluated grid are not searched. Works on 2-D
    (H, W) and 3-D (D, H, W) grids with per-axis (anisotropic) ``spacing_mm``; numpy or
    torch input. Vectorised over voxels (loops run over offsets only); memory is about
    2^ndim + 4 copies of the volume.
    """
    reference = _as_dose(reference, "reference")
    evaluated = _as_dose(evaluated, "evaluated", device=reference.device)
    if evaluated.shape != reference.shape:
        raise ValueError(
            f"ddpm.dose.gamma_pass_rate: evaluated shape {tuple(evaluated.shape)} != "
            f"reference shape {tuple(reference.shape)}"
        )
    if reference.dim() not in (2, 3):
        raise ValueError(
            "ddpm.dose.gamma_pass_rate: expected a 2-D (H, W) or 3-D (D, H, W) dose grid, "
            f"got shape {tuple(reference.shape)}"
        )
    spacing = _as_spacing(spacing_mm, reference.dim())
    for field, value in (("dose_percent", dose_percent), ("distance_mm", distance_mm)):
        if not value > 0:
            raise ValueError(f"ddpm.dose.gamma_pass_rate: {field} must be > 0, got {value}")
    if not 0 <= cutoff_percent < 100:
        raise ValueError(
            f"ddpm.dose.gamma_pass_rate: cutoff_percent must be in [0, 100), got {cutoff_percent}"
        )
    max_step_mm = distance_mm / 10 if max_step_mm is None else float(max_step_mm)
    if not max_step_mm > 0:
        raise ValueError(f"ddpm.dose.gamma_pass_rate: max_step_mm must be > 0, got {max_step_mm}")
    reference_max = float(reference.max())
    if reference_max <= 0:
        raise ValueError("ddpm.dose.gamma_pass_rate: the reference dose has no positive value")

    counted = reference >= cutoff_percent / 100 * reference_max
    if local:
        counted &= reference > 0
    n_counted = int(counted.sum())

    points = counted.nonzero()  # (K, ndim) voxel indices of the counted reference voxels
    ref_dose = reference[counted]  # (K,)
    tolerance = dose_percent / 100 * (ref_dose if local else torch.full_like(ref_dose,
                                                                             reference_max))

    k, reach, cells = _search_cells(spacing, distance_mm, max_step_mm)

    # d = 0 first: most voxels of a good prediction pass there without any search.
    in_place = (evaluated[counted] - ref_dose).abs() <= tolerance
    n_passed = int(in_place.sum())
    # Interpolated evaluated doses are convex combinations of grid values within
    # ceil(reach / k) voxels; a voxel whose dose window [Dr - dD, Dr + dD] misses the range
    # of those values has a dose term > 1 at every offset and fails without a search.
    box = [math.ceil(r / ki) for r, ki in zip(reach, k, strict=True)]
    near_max = _box_max(evaluated, box)[counted]
    near_min = -_box_max(-evaluated, box)[counted]
    undecided = ~in_place & (ref_dose - tolerance <= near_max) & (ref_dose + tolerance >= near_min)
    points, ref_dose, tolerance = points[undecided], ref_dose[undecided], tolerance[undecided]

    # Pad with NaN so every corner lookup stays inside the array; a point that needs a
    # value from outside the grid interpolates to NaN and never passes.
    margin = [r // ki + 1 for r, ki in zip(reach, k, strict=True)]
    padded = F.pad(evaluated, [m for m in reversed(margin) for _ in range(2)], value=math.nan)
    flat = padded.reshape(-1)
    strides = padded.stride()
    base = ((points + torch.tensor(margin, device=points.device)) *
            torch.tensor(strides, device=points.device)).sum(1)  # (K,) flat index

    for cell, near2 in cells:
        if base.numel() == 0:
            break
        # Normalised dose difference (De - Dr) / dD at the 2^ndim corners of this cell for
        # every remaining voxel. Interpolation weights sum to one, so
        # interpolating these equals interpolating De and then normalising.
        corners = torch.stack([
            flat[base + sum((n + c) * st for n, c, st in zip(cell, bits, strides, strict=True))]
            for bits in itertools.product((0, 1), repeat=len(cell))
        ])  # (2^ndim, K)
        corners = ((corners - ref_dose) / tolerance).to(_SEARCH_DTYPE)
        # Interpolated values lie between the corner values, and no lattice point of the
        # cell is nearer than near2: search only voxels whose corner range can reach
        # |difference| <= sqrt(1 - near2 / DTA^2). Padding (NaN) corners bound nothing.
        limit = math.sqrt(max(0.0, 1.0 - near2 / distance_mm**2))
        lowest = torch.nan_to_num(corners, nan=math.inf).amin(0)
        highest = torch.nan_to_num(corners, nan=-math.inf).amax(0)
        searched = ((lowest <= limit) & (highest >= -limit)).nonzero().squeeze(1)  # (A,)
        if searched.numel() == 0:
            continue
        corners = corners[:, searched].reshape(*([2] * len(cell)), -1)
        passed_in_cell = torch.zeros_like(base, dtype=torch.bool)
        # One slab of the cell (a fixed offset along the first axis) at a time, dropping
        # the voxels that passed after each slab so the rest of the search does less work.
        for j in range(k[0]):
            d2 = ((cell[0] + j / k[0]) * spacing[0]) ** 2
            if d2 > distance_mm**2 * (1 + 1e-12):
                continue
            # A zero fraction takes the lower corner as is: its upper one may be padding.
            slab = corners[0] if j == 0 else torch.lerp(corners[0], corners[1], j / k[0])
            passed = torch.zeros_like(searched, dtype=torch.bool)
            _search_cell(slab, cell, 1, d2, k, spacing, distance_mm, passed)
            if passed.any():
                passed_in_cell[searched[passed]] = True
                corners, searched = corners[..., ~passed], searched[~passed]
        if passed_in_cell.any():
            n_passed += int(passed_in_cell.sum())
            keep = ~passed_in_cell
            base, ref_dose, tolerance = base[keep], ref_dose[keep], tolerance[keep]
    return 100.0 * n_passed / n_counted


def _search_cell(values, cell, axis, dist2, k, spacing, distance_mm, passed):
    """Interpolate along one axis at a time over the lattice fractions of ``cell``.

    ``values`` holds normalised corner dose differences (De - Dr) / dD still to be
    interpolated along axes ``axis..``; ``dist2`` the squared offset (mm^2) along the axes
    already fixed. At a lattice point d, gamma <= 1 <=> |De - Dr| / dD <= sqrt(1 - |d|^2 /
    DTA^2); ``passed`` is updated in place.
    """
    n, ki, s = cell[axis], k[axis], spacing[axis]
    for j in range(ki):
        d2 = dist2 + ((n + j / ki) * s) ** 2
        if d2 > distance_mm**2 * (1 + 1e-12):
            continue
        # A zero fraction takes the lower corner as is: its upper neighbour may be padding.
        v = values[0] if j == 0 else torch.lerp(values[0], values[1], j / ki)
        if axis + 1 < len(cell):
            _search_cell(v, cell, axis + 1, d2, k, spacing, distance_mm, passed)
        else:
            allowed = math.sqrt(max(0.0, 1.0 - d2 / distance_mm**2))
            passed |= v.abs() <= allowed
