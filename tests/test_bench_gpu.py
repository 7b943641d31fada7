"""bench/gpu.py's plan on the CPU (``--smoke``): jobs prepared, then timed in rounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_bench_times_every_prepared_job_in_every_round(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--only", "2D ddpm",
                    "3D ddpm", "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["2D ddpm", "3D ddpm"]
    for figures in results.values():
        assert "error" not in figures, figures
        assert figures["rounds"] == 2  # --smoke: 2 rounds of 2 steps and one DDIM run each
        assert figures["train_step_ms"] > 0 and figures["ddim_s"] > 0
        assert figures["train_flops"] > 0 and 0 < figures["mfu"]
