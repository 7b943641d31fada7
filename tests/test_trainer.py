"""The training loop: exact resume, crash safety, the reconstruction alarm, the loss it uses."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from ddpm.checkpoint import load_checkpoint
from ddpm.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def test_resuming_mid_epoch_gives_the_same_weights_bit_for_bit(tiny_root, tmp_path):
    # 6 optimizer steps per epoch here: stop at 4 (mid-epoch), continue to 8 (next epoch)
    straight = tiny_config(tiny_root, train={"run_dir": str(tmp_path / "a"), "max_steps": 8})
    train(straight, progress=False)
    half = tiny_config(tiny_root, train={"run_dir": str(tmp_path / "b"), "max_steps": 4})
    assert train(half, progress=False).step == 4
    rest = tiny_config(tiny_root, train={"run_dir": str(tmp_path / "b"), "max_steps": 8})
    assert train(rest, resume="auto", progress=False).step == 8

    a = load_checkpoint(tmp_path / "a" / "quickstart" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "quickstart" / "checkpoints" / "last.pt")
    for key in ("model", "ema", "optimizer", "lr_schedule", "noise_generator"):
        assert _same_tensors(a[key], b[key]), key


def test_a_fresh_run_refuses_a_folder_that_already_holds_checkpoints(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, train={"run_dir": str(tmp_path), "max_steps": 1})
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume auto"):
        train(cfg, progress=False)


def test_performance_csv_records_the_per_channel_losses_and_both_weight_sets(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, train={"run_dir": str(tmp_path), "epochs": 1})
    train(cfg, progress=False)
    with open(tmp_path / "quickstart" / "performance.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for column in ("loss_image", "loss_mask", "psnr_t50_live", "psnr_t50_ema", "ssim_t250_ema",
                   "dice_t50_live", "ema_distance", "alarm"):
        assert column in rows[0], column
    assert float(rows[0]["psnr_t50_ema"]) > 0


def test_the_alarm_fires_when_the_ema_lags_far_behind_the_live_model(tiny_root, tmp_path, capsys):
    # EMA never updated (as with a bug, or decay 0.9999 without warm-up): it stays at the
    # initial weights while the live model learns.
    common = {"eval": {"timesteps": [250, 500], "batch_size": 8, "val_batches": 1,
                       "alarm_psnr_gap_db": 1.0},
              "optim": {"lr": 2e-3, "warmup_steps": 5}}
    broken = tiny_config(tiny_root, train={"run_dir": str(tmp_path / "broken"), "epochs": 5,
                                           "val_every": 5}, ema={"update_every": 10**6}, **common)
    result = train(broken, progress=False)
    live, ema = result.history[-1]["psnr_t250_live"], result.history[-1]["psnr_t250_ema"]
    assert live > ema + 1.0, (live, ema)
    assert any("EMA x0-PSNR" in a for a in result.alarms)
    assert "Likely causes" in capsys.readouterr().out

    healthy = tiny_config(tiny_root, train={"run_dir": str(tmp_path / "ok"), "epochs": 5,
                                            "val_every": 5}, ema={"decay": 0.99}, **common)
    assert train(healthy, progress=False).alarms == []


def test_a_killed_run_leaves_a_loadable_checkpoint_and_resumes_from_it(tiny_root, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    from ddpm.config import save_config

    save_config(tiny_config(tiny_root, train={"run_dir": str(tmp_path), "epochs": 50}), cfg_path)
    last = tmp_path / "quickstart" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(cfg_path),
                             "--no-progress"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not last.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert last.exists(), "no checkpoint written in time"
        time.sleep(1.0)  # let it train on (and possibly start writing the next checkpoint)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(last)
    assert state["step"] >= 6
    resumed = tiny_config(tiny_root, train={"run_dir": str(tmp_path), "epochs": 50,
                                            "max_steps": state["step"] + 2})
    result = train(resumed, resume="auto", progress=False)
    assert result.step == state["step"] + 2
    assert not list(last.parent.glob("*.tmp"))


def test_ddp_with_two_cpu_ranks_keeps_identical_weights_and_writes_once(tiny_root, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"""
import sys
from pathlib import Path
import torch
import torch.distributed as dist
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import tiny_config
import ddpm.trainer as trainer

captured = {{}}
original = trainer.DistributedDataParallel
def capture(module, *args, **kwargs):
    captured["model"] = module
    return original(module, *args, **kwargs)
trainer.DistributedDataParallel = capture

cfg = tiny_config(Path({str(tiny_root)!r}), train={{"run_dir": {str(tmp_path / 'runs')!r},
                                                     "max_steps": 3}})
trainer.train(cfg, progress=False)
rank = dist.get_rank()
torch.save(captured["model"].state_dict(), Path({str(tmp_path)!r}) / f"rank{{rank}}.pt")
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script)], cwd=REPO, env=env,
                          timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert _same_tensors(rank0, rank1)
    run = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml",
                                                      "performance.csv"]
    with open(run / "performance.csv") as f:
        assert len(list(csv.DictReader(f))) == 1  # one validation row, not one per rank
    assert load_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == 2


def test_non_finite_steps_are_skipped_then_the_run_stops_with_advice(tiny_root, tmp_path):
    from ddpm.trainer import TrainingDiverged

    # an absurd learning rate sends the weights to inf after one step: every later loss is NaN
    cfg = tiny_config(tiny_root, train={"run_dir": str(tmp_path), "nan_patience": 3},
                      optim={"lr": 1e20, "warmup_steps": 1, "grad_clip": 0.0})
    with pytest.raises(TrainingDiverged, match="3 consecutive steps.*optim.lr"):
        train(cfg, progress=False)


def test_training_refuses_a_stale_cache_naming_the_changed_field(tiny_root, tmp_path):
    from ddpm.caching import StaleCacheError

    cfg = tiny_config(tiny_root, train={"run_dir": str(tmp_path)}, data={"z_range": [9, 23]})
    with pytest.raises(StaleCacheError, match="z_range"):
        train(cfg, progress=False)
