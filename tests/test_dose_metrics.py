"""Specification of ddpm.dose: DVH points, OpenKBP scores and the gamma pass rate."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from ddpm.dose import dose_score, dvh_metrics, dvh_score, gamma_pass_rate

# ---------------------------------------------------------------------------------------
# DVH points
# ---------------------------------------------------------------------------------------


def dose_1_to_100():
    """A (4, 5, 5) volume whose 100 voxels carry the doses 1, 2, ..., 100 Gy."""
    return np.arange(1, 101, dtype=np.float64).reshape(4, 5, 5)


def test_ptv_gets_d1_d95_d99_as_linear_percentiles():
    dose = dose_1_to_100()
    metrics = dvh_metrics(dose, {"PTV70": np.ones(dose.shape, bool)}, (2.0, 2.0, 2.5))
    # Sorted doses v[i] = i + 1; the p-th percentile sits at rank p / 100 * 99.
    # D95 -> 5th percentile: rank 4.95 -> 5 + 0.95 = 5.95
    # D99 -> 1st percentile: rank 0.99 -> 1 + 0.99 = 1.99
    # D1 -> 99th percentile: rank 98.01 -> 99 + 0.01 = 99.01
    assert metrics["PTV70"] == pytest.approx({"D95": 5.95, "D99": 1.99, "D1": 99.01})


def test_organ_gets_dmean_and_d01cc_from_the_voxel_volume():
    dose = dose_1_to_100()
    # 2 x 2 x 2.5 mm = 10 mm^3 per voxel, so 0.1 cc = 100 mm^3 = 10 voxels = 10 % of the
    # structure: D0.1cc is the 90th percentile, rank 0.9 * 99 = 89.1 -> 90 + 0.1 = 90.1.
    metrics = dvh_metrics(dose, {"Brainstem": np.ones(dose.shape, bool)}, (2.0, 2.0, 2.5))
    assert metrics["Brainstem"] == pytest.approx({"Dmean": 50.5, "D0.1cc": 90.1})


def test_dvh_points_agree_with_numpy_percentiles_on_a_random_structure():
    rng = np.random.default_rng(0)
    dose = rng.uniform(0, 70, (10, 12, 14))
    mask = rng.random(dose.shape) < 0.3
    inside = dose[mask]
    metrics = dvh_metrics(torch.from_numpy(dose), {"PTV56": mask, "Cord": mask}, (3, 3, 3))
    assert metrics["PTV56"]["D95"] == pytest.approx(np.percentile(inside, 5))
    assert metrics["PTV56"]["D1"] == pytest.approx(np.percentile(inside, 99))
    # 27 mm^3 voxels: round(100 / 27) = 4 voxels in 0.1 cc.
    d01cc = np.percentile(inside, 100 - 100 * 4 / inside.size)
    assert metrics["Cord"] == pytest.approx({"Dmean": inside.mean(), "D0.1cc": d01cc})


def test_structure_smaller_than_01cc_gets_its_minimum_dose():
    dose = dose_1_to_100()
    mask = np.zeros(dose.shape, bool)
    mask.flat[[10, 20, 30, 40, 50]] = True  # 5 voxels of 1 mm^3, doses 11 .. 51 Gy
    metrics = dvh_metrics(dose, {"Lens": mask}, (1.0, 1.0, 1.0))
    assert metrics["Lens"]["D0.1cc"] == pytest.approx(11.0)


def test_only_the_masked_voxels_count():
    dose = dose_1_to_100()
    mask = dose > 50  # doses 51 .. 100
    metrics = dvh_metrics(dose, {"Parotid": mask}, (1.0, 1.0, 1.0))
    assert metrics["Parotid"]["Dmean"] == pytest.approx(75.5)


def test_empty_structure_is_an_error_naming_it():
    dose = dose_1_to_100()
    with pytest.raises(ValueError, match="Larynx"):
        dvh_metrics(dose, {"Larynx": np.zeros(dose.shape, bool)}, (1, 1, 1))


def test_mask_of_another_shape_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dvh_metrics(dose_1_to_100(), {"PTV": np.ones((4, 5, 4), bool)}, (1, 1, 1))


def test_dose_score_is_the_mean_absolute_error_inside_the_body():
    reference = dose_1_to_100()
    body = reference > 20
    pred = reference + np.where(body, 2.0, 30.0)  # errors outside the body do not count
    assert dose_score(pred, reference, body) == pytest.approx(2.0)


def test_dvh_score_is_the_mean_absolute_difference_over_all_points():
    ref = {"PTV70": {"D1": 72.0, "D95": 70.0, "D99": 68.0},
           "Cord": {"Dmean": 20.0, "D0.1cc": 40.0}}
    pred = {"PTV70": {"D1": 73.0, "D95": 68.0, "D99": 68.0},
            "Cord": {"Dmean": 24.0, "D0.1cc": 40.0}}
    assert dvh_score(pred, ref) == pytest.approx((1 + 2 + 0 + 4 + 0) / 5)


def test_dvh_score_refuses_different_structures():
    with pytest.raises(ValueError, match="Cord"):
        dvh_score({"PTV70": {"D95": 1.0}}, {"PTV70": {"D95": 1.0}, "Cord": {"Dmean": 2.0}})


# ---------------------------------------------------------------------------------------
# Gamma pass rate
# ---------------------------------------------------------------------------------------


def smooth_field(shape, seed=0):
    """A smooth random dose in about [0, 100] Gy."""
    field = gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return 100 * (field - field.min()) / (field.max() - field.min())


def step_field(shape, edge, axis=-1, high=100.0):
    """0 Gy before index ``edge`` along ``axis``, ``high`` Gy from it on: a sharp field edge."""
    index = np.arange(shape[axis]).reshape([-1 if a == axis % len(shape) else 1
                                            for a in range(len(shape))])
    return np.broadcast_to(np.where(index >= edge, high, 0.0), shape).copy()


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)], ids=["2d", "3d"])
def test_identical_doses_pass_everywhere(shape):
    dose = smooth_field(shape)
    assert gamma_pass_rate(dose, dose, (1.0,) * len(shape), 1.0, 1.0) == 100.0
    assert gamma_pass_rate(torch.from_numpy(dose), torch.from_numpy(dose), (2.0,) * len(shape),
                           1.0, 1.0) == 100.0


@pytest.mark.parametrize("shape", [(16, 16), (8, 10, 12)], ids=["2d", "3d"])
def test_uniform_2_percent_offset_passes_3_percent_and_fails_1_percent(shape):
    reference = np.full(shape, 60.0)
    evaluated = reference * 1.02
    spacing = (1.0,) * len(shape)
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 3.0) == 100.0
    # In a uniform field no nearby point has a closer dose, so distance cannot rescue.
    assert gamma_pass_rate(evaluated, reference, spacing, 1.0, 1.0) == 0.0


@pytest.mark.parametrize("shape", [(6, 30), (4, 5, 30)], ids=["2d", "3d"])
def test_edge_shifted_by_2_mm_passes_only_where_the_distance_criterion_allows(shape):
    # The field edge moves from index 10 to 12 (1 mm voxels). Reference voxels below the
    # edge are 0 Gy, under the 10 % cutoff; the 20 columns from index 10 on are counted.
    # Column 10 is 2 mm from the nearest matching evaluated dose, column 11 is 1 mm away,
    # the rest match in place.
    reference, evaluated = step_field(shape, 10), step_field(shape, 12)
    spacing = (1.0,) * len(shape)
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 3.0) == 100.0
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 1.5) == pytest.approx(100 * 19 / 20)
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 0.9) == pytest.approx(100 * 18 / 20)


@pytest.mark.parametrize("dta, passes", [(2.2, True), (1.9, False)])
def test_shifted_ramp_passes_iff_the_analytic_gamma_is_at_most_one(dta, passes):
    # Reference D(x) = g x; evaluated = reference shifted by s = 2 mm toward -x, i.e. a dose
    # excess g s everywhere. For a linear ramp Low et al.'s gamma has the closed form
    # gamma = s / sqrt(DTA^2 + (dD / g)^2) at every voxel whose match (toward -x) lies
    # inside the grid; the 10 % cutoff leaves out the first voxels, where it would not.
    g, s, width = 2.5, 2.0, 40
    x = np.arange(width, dtype=np.float64)
    reference = np.tile(g * x, (5, 1))
    evaluated = np.tile(g * (x + s), (5, 1))
    delta_dose = 0.01 * reference.max()  # 1 % global
    gamma = s / math.sqrt(dta**2 + (delta_dose / g) ** 2)
    assert (gamma <= 1) == passes  # 0.89 and 1.03: clear of the threshold
    assert gamma_pass_rate(evaluated, reference, (1.0, 1.0), 1.0, dta) == (100.0 if passes
                                                                           else 0.0)


def test_anisotropic_spacing_turns_voxel_shifts_into_millimetres_per_axis():
    # A 2-voxel shift is 2 mm along a 1 mm axis but 4 mm along a 2 mm axis.
    shape, spacing = (30, 30), (2.0, 1.0)
    along_fine = gamma_pass_rate(step_field(shape, 12, axis=1), step_field(shape, 10, axis=1),
                                 spacing, 3.0, 3.0)
    along_coarse = gamma_pass_rate(step_field(shape, 12, axis=0),
                                   step_field(shape, 10, axis=0), spacing, 3.0, 3.0)
    assert along_fine == 100.0
    # Rows 10 and 11 are 4 and 2 mm from their match: row 10 fails, row 11 passes.
    assert along_coarse == pytest.approx(100 * 19 / 20)


def two_level_plan(shape=(12, 20)):
    """100 Gy in the left half, 20 Gy in the right half."""
    return step_field(shape, shape[-1] // 2, high=-80.0) + 100.0


def test_local_gamma_scales_the_tolerance_with_the_local_dose():
    reference = two_level_plan()
    evaluated = reference + 2.0  # 2 Gy everywhere: 2 % of 100 Gy, but 10 % of 20 Gy
    spacing = (1.0, 1.0)
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 3.0, local=False) == 100.0
    # Local 3 % of 20 Gy is 0.6 Gy: the low half fails (no evaluated dose near 20 Gy
    # anywhere), the high half passes.
    assert gamma_pass_rate(evaluated, reference, spacing, 3.0, 3.0, local=True) == (
        pytest.approx(50.0)
    )


def test_cutoff_excludes_low_dose_reference_voxels():
    reference = step_field((12, 20), 10) + 5.0  # 5 Gy (5 % of max) | 105 Gy
    evaluated = np.where(reference > 50, reference, 50.0)  # low region badly wrong
    spacing = (1.0, 1.0)
    assert gamma_pass_rate(evaluated, reference, spacing, cutoff_percent=10.0) == 100.0
    assert gamma_pass_rate(evaluated, reference, spacing, cutoff_percent=0.0) == (
        pytest.approx(50.0)
    )


def brute_force_pass_rate(evaluated, reference, spacing, dose_percent, distance_mm, local):
    """Gamma by exhaustive search over the documented lattice, with scipy interpolation.

    Offsets j * spacing[a] / k[a] with k[a] = ceil(spacing[a] / (DTA / 10)), |offset| <= DTA;
    points outside the grid are not searched; 10 % cutoff.
    """
    k = [math.ceil(s / (distance_mm / 10) - 1e-9) for s in spacing]
    reach = [math.floor(distance_mm * ki / s + 1e-9) for s, ki in zip(spacing, k)]
    grid = np.indices(reference.shape).astype(np.float64)
    tolerance = dose_percent / 100 * (reference if local else reference.max())
    best = np.full(reference.shape, np.inf)
    for js in itertools.product(*[range(-r, r + 1) for r in reach]):
        offset = np.array([j / ki for j, ki in zip(js, k)])  # voxels
        d2 = float(np.sum((offset * np.array(spacing)) ** 2))
        if d2 > distance_mm**2 * (1 + 1e-12):
            continue
        coords = grid + offset.reshape(-1, *[1] * reference.ndim)
        inside = np.all([(c >= 0) & (c <= n - 1) for c, n in zip(coords, reference.shape)], 0)
        dose = map_coordinates(evaluated, coords, order=1, mode="nearest")
        with np.errstate(divide="ignore", invalid="ignore"):  # zero local tolerance
            gamma2 = d2 / distance_mm**2 + (dose - reference) ** 2 / tolerance**2
        best = np.minimum(best, np.where(inside, gamma2, np.inf))
    counted = reference >= 0.1 * reference.max()
    return 100 * np.mean(best[counted] <= 1)


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize(
    "shape, spacing, criteria",
    [((26, 30), (1.0, 1.5), (3.0, 3.0)), ((8, 9, 10), (2.0, 1.0, 1.5), (2.0, 2.0))],
    ids=["2d", "3d"],
)
def test_pass_rate_equals_an_exhaustive_search_on_a_random_field(shape, spacing, criteria,
                                                                  local):
    reference = smooth_field(shape, seed=1)
    evaluated = 0.7 * reference + 0.3 * smooth_field(shape, seed=2)
    expected = brute_force_pass_rate(evaluated, reference, spacing, *criteria, local)
    assert 0 < expected < 100  # the case must exercise both outcomes
    assert gamma_pass_rate(evaluated, reference, spacing, *criteria, local=local) == (
        pytest.approx(expected)
    )


def test_gamma_refuses_mismatched_shapes_and_spacing():
    dose = smooth_field((10, 10))
    with pytest.raises(ValueError, match="shape"):
        gamma_pass_rate(dose, dose[:, :9], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        gamma_pass_rate(dose, dose, (1.0, 1.0, 1.0))


def test_gamma_refuses_a_reference_without_dose():
    with pytest.raises(ValueError, match="positive"):
        gamma_pass_rate(np.zeros((8, 8)), np.zeros((8, 8)), (1.0, 1.0))
