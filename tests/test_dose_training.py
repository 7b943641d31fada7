"""The dose workload end to end: config switches, training every objective through train(),
whole-volume sliding-window prediction in Gy, and the evaluation's tables."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.config import ConfigError, config_from_dict
from ddpm.dose_cache import build_dose_cache
from ddpm.dose_data import DoseVolumeDataset
from ddpm.dose_eval import DoseEvalSettings, evaluate_dose, load_dose_model, wants_dose_evaluation
from ddpm.dose_predict import predict_dose
from ddpm.runtime import Dist
from ddpm.tasks import PatchEpochSampler
from ddpm.trainer import train

REPO = Path(__file__).resolve().parents[1]

# 4 phantom patients of 24^3 voxels resampled to 21 mm: 16^3 volumes, split 2 / 1 / 1.
TINY_DOSE = {
    "dose": {"n_patients": 4, "phantom_size": 24, "spacing_mm": [21.0, 21.0, 21.0],
             "split_fractions": [0.5, 0.25, 0.25], "patch_size": 8, "window_batch": 27},
    "model": {"dims": 3, "in_channels": 1, "out_channels": 1, "base_channels": 8,
              "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [],
              "num_heads": 2, "norm_groups": 4, "conditioning": "none"},
    "diffusion": {"prediction": "v", "timesteps": 100},
    "loss": {"channel_weights": [1.0]},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "train": {"task": "dose", "epochs": 2, "batch_size": 4, "val_every": 1, "sample_every": 2,
              "log_every": 1},
    "eval": {"timesteps": [10, 50], "batch_size": 2, "val_batches": 1},
    "sample": {"steps": 3},
}


def tiny_dose_config(root, objective="diffusion", **sections):
    """The tiny dose config rooted in ``root``; ``sections`` update it section by section."""
    d = {k: dict(v) for k, v in TINY_DOSE.items()}
    d["dose"].update(root=str(root / "data"), cache_dir=str(root / "cache"))
    d["model"]["objective"] = objective
    d["train"].update(run_dir=str(root / "runs"), name=objective)
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return config_from_dict(d, source="tiny dose config")


@pytest.fixture(scope="session")
def dose_root(tmp_path_factory):
    """A folder holding the tiny dose phantoms and their cache (built once)."""
    root = tmp_path_factory.mktemp("tiny_dose")
    build_dose_cache(tiny_dose_config(root).dose, progress=False)
    return root


@pytest.fixture(scope="session")
def trained(dose_root):
    """One short training run per objective: {objective: path of last.pt}."""
    paths = {}
    for objective in ("regression", "diffusion", "flow"):
        result = train(tiny_dose_config(dose_root, objective), progress=False)
        paths[objective] = result.run_dir / "checkpoints" / "last.pt"
    return paths


# ----------------------------------------------------------------------------- config


def test_one_key_switches_the_objective_and_the_input_channels_follow(dose_root):
    channels = {o: tiny_dose_config(dose_root, o).input_channels
                for o in ("diffusion", "flow", "regression")}
    assert channels == {"diffusion": 10, "flow": 10, "regression": 9}  # dose + CT + 8 masks


def test_the_dose_task_refuses_a_2d_model(dose_root):
    with pytest.raises(ConfigError, match="model.dims 3"):
        tiny_dose_config(dose_root, model={"dims": 2})


def test_the_lesion_task_refuses_the_flow_objective():
    with pytest.raises(ConfigError, match="model.objective 'flow' needs train.task 'dose'"):
        config_from_dict({"model": {"objective": "flow"}})


def test_a_patch_the_unet_cannot_halve_is_refused(dose_root):
    with pytest.raises(ConfigError, match="dose.patch_size=5 must be divisible by 2"):
        tiny_dose_config(dose_root, dose={"patch_size": 5})


def test_training_refuses_a_cache_with_other_anatomy_channels(dose_root):
    cfg = tiny_dose_config(dose_root, dose={"anatomy_channels": 5})
    with pytest.raises(ValueError, match="dose.anatomy_channels: 9"):
        train(cfg, progress=False)


# ----------------------------------------------------------------------------- data order


def test_every_epoch_draws_fresh_patches_and_ranks_split_them():
    one = PatchEpochSampler(10, Dist())
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert first == list(range(10)) and list(one) == list(range(10, 20))
    ranks = [PatchEpochSampler(10, Dist(rank=r, world_size=2)) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(30, 40))


def test_a_resumed_epoch_skips_the_patches_already_seen():
    sampler = PatchEpochSampler(10, Dist())
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == list(range(24, 30)) and len(sampler) == 6


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("objective, column", [("regression", "mae_gy_ema"),
                                               ("diffusion", "mae_gy_t10_ema"),
                                               ("flow", "mae_gy_t50_live")])
def test_every_objective_trains_through_train_and_logs_dose_errors_in_gy(trained, objective,
                                                                         column):
    state = load_checkpoint(trained[objective])
    assert state["step"] == 2 * 4  # 2 epochs of 16 patches in batches of 4
    assert state["config"]["model"]["objective"] == objective
    assert state["cache_meta"]["channels"]["anatomy"][0] == "ct"
    run = trained[objective].parents[1]
    with open(run / "performance.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and 0 < float(rows[-1][column]) < 80
    assert all(float(r["train_loss"]) > 0 for r in rows)
    assert (run / "samples" / "epoch_0002.png").is_file()


def test_a_resumed_dose_run_ends_with_the_same_weights_bit_for_bit(dose_root, tmp_path):
    # 4 steps per epoch: stop at 3 (mid-epoch), continue to 5 (into the next epoch)
    straight = tiny_dose_config(dose_root, train={"run_dir": str(tmp_path / "a"), "max_steps": 5})
    train(straight, progress=False)
    half = tiny_dose_config(dose_root, train={"run_dir": str(tmp_path / "b"), "max_steps": 3})
    train(half, progress=False)
    rest = tiny_dose_config(dose_root, train={"run_dir": str(tmp_path / "b"), "max_steps": 5})
    assert train(rest, resume="auto", progress=False).step == 5
    a = load_checkpoint(tmp_path / "a" / "diffusion" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "diffusion" / "checkpoints" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resuming_with_another_objective_is_refused(dose_root, tmp_path):
    train(tiny_dose_config(dose_root, train={"run_dir": str(tmp_path), "max_steps": 1}),
          progress=False)
    other = tiny_dose_config(dose_root, "flow", train={"run_dir": str(tmp_path),
                                                       "name": "diffusion", "max_steps": 2})
    with pytest.raises(ValueError, match="model.objective: checkpoint 'diffusion'"):
        train(other, resume="auto", progress=False)


# ----------------------------------------------------------------------------- inference


class WindowRecorder(torch.nn.Module):
    """Wraps a model and records the (batch, *spatial) size of every input it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t):
        self.calls.append((x.shape[0], *x.shape[2:]))
        return self.model(x, t)


@pytest.mark.parametrize("objective", ["regression", "diffusion", "flow"])
def test_whole_volume_prediction_runs_window_by_window_at_every_step(trained, dose_root,
                                                                     objective):
    m = load_dose_model(trained[objective], device="cpu")
    anatomy = DoseVolumeDataset(dose_root / "cache", "test")[0]["anatomy"]  # (9, 16, 16, 16)
    recorder = WindowRecorder(m.model)
    steps = 4
    out = predict_dose(recorder, m.cfg, anatomy, schedule=m.schedule, steps=steps, seeds=(0, 1))
    samples = 2 if objective != "regression" else 1
    assert out.shape == (samples, 1, 16, 16, 16)
    # 16^3 with 8^3 windows at overlap 0.5: 3 positions per axis, all 27 in one call per step
    # (window_batch 27), each call holding the windows of every sample.
    passes = steps if objective != "regression" else 1
    assert recorder.calls == [(27 * samples, 8, 8, 8)] * passes


def test_a_sample_depends_on_its_own_seed_only(trained, dose_root):
    m = load_dose_model(trained["diffusion"], device="cpu")
    anatomy = DoseVolumeDataset(dose_root / "cache", "test")[0]["anatomy"]
    pair = predict_dose(m.model, m.cfg, anatomy, schedule=m.schedule, seeds=(0, 1))
    alone = predict_dose(m.model, m.cfg, anatomy, schedule=m.schedule, seeds=(1,))
    torch.testing.assert_close(pair[1:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.equal(pair[0], pair[1])


# ----------------------------------------------------------------------------- evaluation


def test_the_evaluation_writes_comparison_and_ablation_tables_in_gy(trained, tmp_path):
    settings = DoseEvalSettings(steps=[1, 3], ensemble=[1, 2], ablation_samples=2)
    paths = [trained[o] for o in ("regression", "diffusion", "flow")]
    metrics = evaluate_dose(paths, tmp_path, settings, device="cpu", progress=False)
    with open(tmp_path / "comparison.csv") as f:
        comparison = {r["model"]: r for r in csv.DictReader(f)}
    assert set(comparison) == {"regression", "diffusion", "flow"}
    for row in comparison.values():
        assert 0 < float(row["mae_gy"]) < 80
        assert 0 <= float(row["gamma_3pct_3mm"]) <= 100
        assert float(row["gamma_2pct_2mm"]) <= float(row["gamma_3pct_3mm"])
    with open(tmp_path / "steps_ablation.csv") as f:
        steps = [(r["model"], int(r["steps"])) for r in csv.DictReader(f)]
    assert steps == [("diffusion", 1), ("diffusion", 3), ("flow", 1), ("flow", 3)]
    ensemble = {(r["model"], r["ensemble"]): r for r in metrics["ensemble_ablation"]}
    assert ensemble[("diffusion", 1)]["std_gy"] == 0.0 < ensemble[("diffusion", 2)]["std_gy"]
    for name in ("per_patient.csv", "dvh_errors.csv", "steps_ablation.png",
                 "ensemble_ablation.png", "summary.md"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "test"


def test_the_evaluation_refuses_a_cache_built_with_other_settings(trained, dose_root, tmp_path):
    from ddpm.caching import StaleCacheError

    other = tiny_dose_config(dose_root, dose={"dose_scale_gy": 70.0,
                                              "cache_dir": str(tmp_path / "cache70")})
    build_dose_cache(other.dose, progress=False)
    with pytest.raises(StaleCacheError, match="dose_scale_gy"):
        evaluate_dose([trained["regression"]], tmp_path / "out", cache_dir=tmp_path / "cache70",
                      device="cpu", progress=False)


def test_the_evaluation_script_runs_and_evaluate_py_can_route_to_it(trained, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_dose", REPO / "evaluate_dose.py")
    evaluate_dose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_dose)
    argv = ["--checkpoint", str(trained["diffusion"]), "--out", str(tmp_path), "--steps", "2,3",
            "--ablation-samples", "1", "--no-progress"]
    assert wants_dose_evaluation(argv)
    assert evaluate_dose.main(argv) == 0
    assert "+0.0% vs 3 steps" in capsys.readouterr().out
    assert not wants_dose_evaluation(["--checkpoint", str(tmp_path / "missing.pt")])
