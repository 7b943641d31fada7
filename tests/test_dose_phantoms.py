"""Specification of the synthetic thorax patients: CT, structures and a planned dose."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ddpm.dose_phantoms import DOSE_STRUCTURES, dose_phantom, generate_dose_phantoms


def _read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def patient():
    return dose_phantom(48, seed=0)


# --- dose phantoms --------------------------------------------------------------------------

def test_dose_phantom_holds_ct_dose_every_structure_and_an_affine(patient):
    assert patient["ct"].shape == patient["dose"].shape == (48, 48, 48)
    assert patient["ct"].dtype == patient["dose"].dtype == np.float32
    assert tuple(patient["structures"]) == DOSE_STRUCTURES
    assert sum(name.startswith("PTV") for name in DOSE_STRUCTURES) >= 1
    for name, mask in patient["structures"].items():
        assert mask.dtype == bool and mask.shape == (48, 48, 48), name
        assert mask.any(), f"{name} is empty"
    assert nib.aff2axcodes(patient["affine"]) == ("R", "A", "S")


def test_same_seed_gives_identical_dose_phantoms(patient):
    again = dose_phantom(48, seed=0)
    assert np.array_equal(again["ct"], patient["ct"])
    assert np.array_equal(again["dose"], patient["dose"])
    for name in DOSE_STRUCTURES:
        assert np.array_equal(again["structures"][name], patient["structures"][name])


def test_different_seeds_give_different_patients(patient):
    other = dose_phantom(48, seed=1)
    assert not np.array_equal(other["ct"], patient["ct"])
    assert not np.array_equal(other["structures"]["PTV_high"], patient["structures"]["PTV_high"])


def test_ct_values_match_thorax_tissues(patient):
    ct, s = patient["ct"], patient["structures"]
    assert np.median(ct[~s["Body"]]) < -950  # air
    assert -900 < np.median(ct[s["Lung_L"] | s["Lung_R"]]) < -700
    assert -100 < np.median(ct[s["Heart"]]) < 100
    assert ct[s["Body"]].max() > 300  # bone


def test_left_lung_and_heart_lie_on_the_patients_left(patient):
    s, affine = patient["structures"], patient["affine"]
    x_mm = affine[0, 0] * np.arange(48) + affine[0, 3]
    mean_x = {name: x_mm[np.nonzero(s[name])[0]].mean() for name in ("Lung_L", "Lung_R",
                                                                       "Heart")}
    assert mean_x["Lung_L"] < 0 < mean_x["Lung_R"]  # RAS: x grows towards the patient's right
    assert mean_x["Heart"] < 0


@pytest.mark.parametrize("seed", range(4))
def test_dose_covers_the_high_ptv_at_the_prescription(seed):
    p = dose_phantom(48, seed=seed)
    rx, dose = p["prescription_gy"], p["dose"][p["structures"]["PTV_high"]]
    assert 50 <= rx <= 70
    assert abs(np.median(dose) - rx) <= 0.05 * rx
    assert np.percentile(dose, 5) >= 0.88 * rx  # D95
    assert np.percentile(dose, 98) <= 1.1 * rx  # D2


def test_low_ptv_receives_less_than_the_high_ptv(patient):
    s, dose = patient["structures"], patient["dose"]
    assert 0.6 * patient["prescription_gy"] < np.median(dose[s["PTV_low"]]) < np.median(
        dose[s["PTV_high"]])


def test_dose_falls_off_with_distance_from_the_ptv(patient):
    s, dose = patient["structures"], patient["dose"]
    distance = ndimage.distance_transform_edt(~s["PTV_high"], sampling=patient["affine"][0, 0])
    shells = [(0, 10), (10, 25), (25, 50), (50, np.inf)]
    means = [dose[s["Body"] & (distance > lo) & (distance <= hi)].mean() for lo, hi in shells]
    assert np.all(np.diff(means) < 0)
    assert means[-1] < 0.1 * patient["prescription_gy"]


def test_dose_is_zero_outside_the_body_and_never_negative(patient):
    assert np.all(patient["dose"][~patient["structures"]["Body"]] == 0)
    assert patient["dose"].min() >= 0


def test_spinal_cord_is_spared(patient):
    s, dose = patient["structures"], patient["dose"]
    assert dose[s["SpinalCord"]].max() < 0.75 * patient["prescription_gy"]


def test_generate_dose_phantoms_writes_nifti_and_a_manifest(tmp_path):
    manifest = generate_dose_phantoms(tmp_path / "dose", n_patients=2, size=24, seed=0,
                                      progress=False)
    rows = _read_manifest(manifest)
    assert rows[0] == ["patient", "ct", "dose", *DOSE_STRUCTURES]
    assert len(rows) == 3
    for row in rows[1:]:
        ct = nib.load(manifest.parent / row[1])
        assert ct.shape == (24, 24, 24) and ct.get_data_dtype() == np.float32
        for name in row[3:]:
            mask = nib.load(manifest.parent / name)
            assert mask.get_data_dtype() == np.uint8 and np.allclose(mask.affine, ct.affine)
    patient = dose_phantom(24, seed=json.loads((manifest.parent / "phantoms.json").read_text())
                           ["patient_seeds"][0])
    assert np.array_equal(nib.load(manifest.parent / rows[1][2]).get_fdata(dtype=np.float32),
                          patient["dose"])
