"""The README's main job, shortened: train.py on configs/quickstart.yaml from nothing."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end_from_nothing(tmp_path):
    overrides = [f"train.run_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.root={tmp_path / 'data'}", "train.epochs=1", "train.sample_every=1",
                 "sample.steps=10"]
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    assert (tmp_path / "data" / "manifest.csv").exists()  # phantoms generated
    assert (tmp_path / "cache" / "meta.yaml").exists()  # cache built
    assert (run / "samples" / "epoch_0001.png").exists()
    assert (run / "checkpoints" / "last.pt").exists()
    with open(run / "performance.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["psnr_t50_ema"]) > 0  # the one-step reconstruction is not garbage
