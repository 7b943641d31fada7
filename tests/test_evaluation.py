"""Evaluation and diagnosis: KID, bin-aware scores, lesion measures, the checklist, the script."""

import json
import math
import types

import pytest
import torch
from test_generation import load_script, tiny_trained_checkpoint

from ddpm.builders import build_model
from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.classifier import ClassifierSettings, load_or_train
from ddpm.config import config_from_dict
from ddpm.diagnose import (
    FAIL,
    PASS,
    WARN,
    check_data_range,
    check_ema_age,
    check_postprocessing,
    check_schedule,
    diagnose,
    initial_weight_fraction,
)
from ddpm.ema import EMA
from ddpm.evaluation import (
    best_match,
    kid,
    lesion_measures,
    mean_pairwise_dissimilarity,
    mmd2_unbiased,
    polynomial_kernel,
)
from ddpm.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_root):
    return tiny_trained_checkpoint(tmp_path_factory, tiny_root)


def rademacher(n, generator, shift=0.0):
    """n draws of +-1 (plus ``shift``) as (n, 1) float64 features."""
    return (torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1).double() + shift


# --- KID ---------------------------------------------------------------------------------------


def test_mmd2_unbiased_is_the_formula_written_out_pair_by_pair():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(4, 3, generator=g).double()

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    within_y = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    cross = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / (5 * 4)
    assert mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * cross, rel=1e-12)
    assert polynomial_kernel(x, y)[2, 3].item() == pytest.approx(k(x[2], y[3]), rel=1e-12)


def test_mmd2_estimates_average_to_the_known_population_value():
    # 1-D features, k(x, y) = (xy + 1)^3 = sum_k c_k (xy)^k with c = (1, 3, 3, 1), so
    # MMD^2 = sum_k c_k (E X^k - E Y^k)^2. X = +-1: moments (0, 1, 0); Y = X + 0.5:
    # (0.5, 1.25, 1.625) -> MMD^2 = 3 * 0.25 + 3 * 0.0625 + 1.625^2 = 3.578125.
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([mmd2_unbiased(rademacher(32, g), rademacher(32, g, 0.5))
                           for _ in range(2000)])
    standard_error = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - 3.578125) < 4 * standard_error


def test_mmd2_of_identical_distributions_averages_to_zero_where_the_biased_one_would_not():
    g = torch.Generator().manual_seed(1)
    values = torch.tensor([mmd2_unbiased(rademacher(32, g), rademacher(32, g))
                           for _ in range(2000)])
    standard_error = values.std() / math.sqrt(len(values))
    # the biased (V-statistic) estimate would sit at (k(x,x) - E k(x,x')) (1/m + 1/n) = 0.25
    assert abs(values.mean()) < 4 * standard_error < 0.05


def test_kid_of_two_samples_of_one_distribution_is_about_zero():
    g = torch.Generator().manual_seed(2)
    result = kid(torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g),
                 subset_size=100, n_subsets=50)
    assert abs(result["mean"]) < 3 * result["std"] / math.sqrt(50) + 1e-3
    assert result["subset_size"] == 100 and result["n_subsets"] == 50


def test_kid_of_shifted_features_is_clearly_positive():
    g = torch.Generator().manual_seed(3)
    result = kid(torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g) + 0.5,
                 subset_size=100, n_subsets=50)
    assert result["mean"] > 10 * result["std"] / math.sqrt(50)


def test_label_matched_kid_is_about_zero_for_equal_conditionals():
    # Features that depend strongly on the label: pairing same-label items must not bias the
    # estimate (counting matched pairs in the cross term would make it clearly negative).
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (2000,), generator=g)
    centres = torch.randn(4, 8, generator=g) * 3

    def draw(lab):
        return centres[lab] + torch.randn(len(lab), 8, generator=g)

    real, fake = draw(labels[:1000]), draw(labels[1000:])
    result = kid(real, fake, subset_size=100, n_subsets=100, real_labels=labels[:1000],
                 fake_labels=labels[1000:])
    assert abs(result["mean"]) < 4 * result["std"] / math.sqrt(100)


# --- bin-aware scores, diversity, lesions --------------------------------------------------------


def test_best_match_finds_the_real_slice_a_sample_copies():
    g = torch.Generator().manual_seed(5)
    reals = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    samples = torch.stack([reals[4], reals[1] * 0.9])
    best_psnr, best_ssim = best_match(samples, reals)
    assert best_psnr[0] == math.inf and best_ssim[0].item() == pytest.approx(1.0)
    assert math.isfinite(best_psnr[1]) and best_ssim[1] < 1.0


def test_diversity_is_zero_for_copies_and_grows_with_differences():
    g = torch.Generator().manual_seed(6)
    image = torch.rand(1, 1, 16, 16, generator=g)
    assert mean_pairwise_dissimilarity(image.repeat(4, 1, 1, 1)) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_dissimilarity(torch.rand(4, 1, 16, 16, generator=g)) > 0.5
    assert math.isnan(mean_pairwise_dissimilarity(image))


def test_lesion_area_and_contrast_of_a_known_square():
    x = torch.full((2, 2, 16, 16), -1.0)
    x[0, 0] = 0.2  # tissue
    x[0, 0, 6:9, 6:9] = 0.9  # a bright 3x3 lesion ...
    x[0, 1, 6:9, 6:9] = 1.0  # ... and its mask
    measures = lesion_measures(x, ring_width=2)  # slice 1 has no lesion: left out
    assert measures["area"].tolist() == [9.0]
    assert measures["contrast"][0] == pytest.approx(0.7)


# --- classifier cache ----------------------------------------------------------------------------


def test_classifier_is_trained_once_and_retrained_when_the_cache_changes(tmp_path):
    g = torch.Generator().manual_seed(7)
    images = torch.rand(24, 1, 16, 16, generator=g) * 2 - 1
    z, p = torch.arange(24) % 3, torch.arange(24) % 2
    settings = ClassifierSettings(epochs=1, width=8, feature_dim=16)
    meta = {"settings_hash": "aaaa", "n_bins": 3, "image_size": 16}
    _, trained = load_or_train(tmp_path, meta, images, z, p, settings, progress=False)
    _, again = load_or_train(tmp_path, meta, images, z, p, settings, progress=False)
    _, other = load_or_train(tmp_path, {**meta, "settings_hash": "bbbb"}, images, z, p,
                             settings, progress=False)
    assert (trained, again, other) == (True, False, True)
    assert (tmp_path / "classifier.pt").is_file()


# --- individual checks ---------------------------------------------------------------------------


def test_initial_weight_fraction_is_the_product_of_the_decays_used():
    assert initial_weight_fraction(0, 0.99, warmup=True) == 1.0
    assert initial_weight_fraction(50, 0.99, warmup=False) == pytest.approx(0.99**50)
    product = 1.0
    for k in range(300):  # warm-up decay min(0.99, (1 + k) / (10 + k))
        product *= min(0.99, (1 + k) / (10 + k))
    assert initial_weight_fraction(300, 0.99, warmup=True) == pytest.approx(product, rel=1e-9)


def test_ema_never_updated_fails_and_a_young_ema_without_warmup_fails():
    assert check_ema_age(0, 0.999, True, step=100).verdict == FAIL
    assert check_ema_age(100, 0.999, False, step=100).verdict == FAIL  # 0.999^100 = 90% init
    assert check_ema_age(100, 0.999, True, step=100).verdict == PASS
    assert check_ema_age(50, 0.9, True, step=100).verdict == WARN  # half the updates missing


def test_a_sampling_schedule_other_than_the_training_one_fails():
    training = NoiseSchedule("cosine", 1000)
    assert check_schedule(NoiseSchedule("cosine", 1000), training).verdict == PASS
    assert check_schedule(NoiseSchedule("linear", 1000), training).verdict == FAIL
    assert check_schedule(NoiseSchedule("cosine", 500), training).verdict == FAIL
    record = {**training.describe(), "betas": training.betas * 1.01}
    assert check_schedule(NoiseSchedule("cosine", 1000), record).verdict == FAIL


def test_a_config_file_that_now_names_another_schedule_only_warns():
    training = NoiseSchedule("cosine", 1000)
    now = types.SimpleNamespace(schedule="linear", timesteps=1000, zero_terminal_snr=False)
    check = check_schedule(NoiseSchedule("cosine", 1000), training, current=now)
    assert check.verdict == WARN and "linear" in check.explanation


def test_data_outside_the_metric_range_fails():
    meta = {"normalisation": {"range": [-1.0, 1.0]}}
    good = torch.cat([torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8),
                      torch.ones(1, 1, 8, 8)], 1)
    assert check_data_range(meta, {"train": good}).verdict == PASS
    assert check_data_range(meta, {"train": good * 1.5}).verdict == FAIL
    assert check_data_range({"normalisation": {"range": [0.0, 1.0]}},
                            {"train": good}).verdict == FAIL


def test_post_processing_that_moves_the_metric_warns():
    assert check_postprocessing({"raw": 20.0, "clamped": 20.4}, 50).verdict == PASS
    assert check_postprocessing({"raw": 20.0, "clamped": 23.0}, 50).verdict == WARN


# --- the checklist on real checkpoints -----------------------------------------------------------


def _with_ema_from_initial_weights(checkpoint, path, keep_num_updates: bool):
    """A copy of ``checkpoint`` whose EMA holds the untrained initial weights."""
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation
    ema = EMA(build_model(cfg), decay=cfg.ema.decay, warmup=cfg.ema.warmup).state_dict()
    if keep_num_updates:
        ema["num_updates"] = state["ema"]["num_updates"]
    state["ema"] = ema
    return save_checkpoint(state, path)


DIAGNOSE = dict(n_samples=4, steps=2, timesteps=[50, 250, 500], recon_slices=16,
                device="cpu", progress=False)


def test_a_healthy_checkpoint_has_no_failed_check(checkpoint):
    checks = {c.name: c for c in diagnose(checkpoint, **DIAGNOSE)}
    assert not [c for c in checks.values() if c.verdict == FAIL], checks
    assert checks["EMA age"].verdict == PASS and checks["x0 reconstruction"].verdict == PASS
    # The checkpoint records the training betas, so the schedule check compares them.
    assert checks["schedule"].values["max_beta_difference"] == 0.0


def test_a_sampling_schedule_with_other_betas_than_the_checkpoint_records_fails(
        checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["schedule"]["betas"] = state["schedule"]["betas"] * 1.01
    altered = save_checkpoint(state, tmp_path / "altered_betas.pt")
    checks = {c.name: c for c in diagnose(altered, **DIAGNOSE)}
    assert checks["schedule"].verdict == FAIL and "betas" in checks["schedule"].explanation


def test_an_ema_never_updated_fails_the_ema_checks(checkpoint, tmp_path):
    broken = _with_ema_from_initial_weights(checkpoint, tmp_path / "broken.pt", False)
    checks = {c.name: c for c in diagnose(broken, **DIAGNOSE)}
    assert checks["EMA age"].verdict == FAIL
    assert "never updated" in checks["EMA age"].explanation
    assert checks["x0 reconstruction"].verdict == FAIL
    assert "EMA" in checks["x0 reconstruction"].explanation
    assert "ema.decay" in checks["x0 reconstruction"].advice


def test_ema_weights_lost_despite_a_normal_update_count_fail_on_reconstruction(
        checkpoint, tmp_path):
    broken = _with_ema_from_initial_weights(checkpoint, tmp_path / "reset.pt", True)
    checks = {c.name: c for c in diagnose(broken, **DIAGNOSE)}
    assert checks["EMA age"].verdict == PASS  # the counter alone cannot tell
    assert checks["x0 reconstruction"].verdict == FAIL


# --- evaluate.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_main():
    return load_script("evaluate")


def test_evaluate_writes_metrics_with_every_section_csvs_and_plots(
        evaluate_main, checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(checkpoint), "--out", str(out), "-n", "2",
                          "--steps", "2", "--timesteps", "50,250", "--recon-slices", "16",
                          "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for section in ("reconstruction", "generation", "condition_faithfulness", "distribution"):
        assert section in metrics
    recon = metrics["reconstruction"]
    assert recon["timesteps"] == [50, 250]
    assert set(recon["live"]) == set(recon["ema"]) >= {"psnr_t50", "ssim_t250", "dice_t50"}
    rows = metrics["generation"]["per_condition"]
    assert rows and all(r["n_generated"] >= 2 for r in rows)
    assert all(0 <= r["best_ssim"] <= 1 for r in rows)
    faithful = metrics["condition_faithfulness"]
    for name in ("real", "generated"):
        assert set(faithful[name]) == {"n", "z_exact", "z_within1", "lesion"}
        assert faithful[name]["z_exact"] <= faithful[name]["z_within1"]
    dist = metrics["distribution"]
    assert {"mean", "std"} <= set(dist["kid_generated_vs_real"]) and "kid_train_vs_real" in dist
    assert {"lesion_area_px", "lesion_contrast"} <= set(dist)
    for name in ("reconstruction.csv", "generation_by_condition.csv", "samples.npz",
                 "reconstruction_psnr_vs_t.png", "lesion_distributions.png",
                 "condition_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert (checkpoint.parent / "classifier.pt").is_file()
    assert "KID" in capsys.readouterr().out


def test_evaluate_diagnose_prints_verdicts_writes_json_and_fails_a_broken_ema(
        evaluate_main, checkpoint, tmp_path, capsys):
    broken = _with_ema_from_initial_weights(checkpoint, tmp_path / "broken.pt", False)
    argv = ["--checkpoint", str(broken), "--out", str(tmp_path), "--diagnose", "--steps", "2",
            "--timesteps", "50,250,500", "--recon-slices", "16",
            "--diagnose-samples", "2", "--no-progress"]
    assert evaluate_main(argv) == 1
    printed = capsys.readouterr().out
    assert "[FAIL] EMA age" in printed and "try:" in printed
    report = json.loads((tmp_path / "diagnose.json").read_text())
    assert report["overall"] == FAIL
    assert {c["name"] for c in report["checks"]} == {
        "schedule", "data range", "EMA age", "EMA distance", "x0 reconstruction",
        "post-processing", "sample statistics"}


def test_evaluate_refuses_a_cache_built_with_other_settings(evaluate_main, checkpoint,
                                                            tmp_path, capsys):
    state = load_checkpoint(checkpoint)
    state["config"]["data"]["clip_percentiles"] = [1.0, 99.0]
    stale = save_checkpoint(state, tmp_path / "stale.pt")
    assert evaluate_main(["--checkpoint", str(stale), "--out", str(tmp_path / "o"),
                          "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stale" in err and "clip_percentiles" in err
