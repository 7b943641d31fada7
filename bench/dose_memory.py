"""Peak memory of one 3D dose training step, with and without gradient checkpointing.

    python bench/dose_memory.py                                # quick-start UNet, 64^3, 128^3
    python bench/dose_memory.py --config configs/dose3d_ddpm.yaml --sizes 64 --batch 0

Every measurement runs in a fresh process, so peaks never mix: it builds the UNet and the
objective of the config, then times one optimizer step (forward, backward, clipping, AdamW,
whose moment buffers are allocated here) on a random patch of size^3, ``--batch`` patches
(default 1, the published batch; 0 keeps the config's ``train.batch_size``). On a CPU it
reports the peak resident memory of the process (VmHWM) and its growth over the memory held
just before the step; on CUDA the peak allocated GPU memory. The CPU runs in float32 (CPU
autocast is not what a GPU run would use). Results go to stdout and
``bench/results/dose_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import current_rss_mb, peak_rss_mb, write_json_atomic  # noqa: E402


def measure(config: str, size: int, checkpointing: bool, device_name: str, batch: int | None
            ) -> dict:
    """One training step in this process; returns its memory and time."""
    import torch

    from ddpm.builders import build_model, build_schedule
    from ddpm.config import load_config
    from ddpm.losses import DiffusionLoss
    from ddpm.objectives import build_objective
    from ddpm.runtime import resolve_device

    torch.set_flush_denormal(True)  # zero-initialised layers give denormal gradients at first
    overrides = [f"dose.patch_size={size}",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    if batch is not None:
        overrides.append(f"train.batch_size={batch}")
    cfg = load_config(config, overrides)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    loss_fn = DiffusionLoss(("dose",), cfg.loss.channel_weights,
                            min_snr_gamma=cfg.loss.min_snr_gamma,
                            prediction=cfg.diffusion.prediction).to(device)
    objective = build_objective(cfg, build_schedule(cfg).to(device), loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    b, a = cfg.train.batch_size, cfg.dose.anatomy_channels
    x0 = torch.rand((b, 1, size, size, size), device=device) * 2 - 1
    anatomy = torch.rand((b, a, size, size, size), device=device).round() * 2 - 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    dtype = dtype if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    generator = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = current_rss_mb()
    start = time.perf_counter()
    loss, _ = objective(model, x0, {}, anatomy, generator, autocast)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"config": config, "size": size, "batch": b, "checkpointing": checkpointing,
              "device": str(device), "objective": cfg.model.objective,
              "widths": [cfg.model.base_channels * m for m in cfg.model.channel_mults],
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "step_s": seconds, "loss_finite": bool(torch.isfinite(loss))}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mb"] = peak_rss_mb()
        result["step_growth_mb"] = result["peak_rss_mb"] - before
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["configs/dose3d_ddpm_quick.yaml"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--batch", type=int, default=1,
                   help="patches per step (default 1, as published; 0: the config's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dose_memory.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job run in a fresh process
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(**job)))
        return 0

    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"{'config':<30} {'size':>5} {'batch':>5} {'ckpt':>5} {'peak MiB':>9} {'step MiB':>9} "
          f"{'step s':>7}")
    for config in args.config:
        for size in args.sizes:
            for checkpointing in (False, True):
                job = json.dumps({"config": config, "size": size, "checkpointing": checkpointing,
                                  "device_name": args.device, "batch": args.batch or None})
                done = subprocess.run([sys.executable, __file__, "--worker", job], cwd=ROOT,
                                      env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    reason = done.stderr.strip().splitlines()[-1:] or [
                        f"exit code {done.returncode} (killed: out of memory?)"]
                    results.append({"config": config, "size": size,
                                    "checkpointing": checkpointing, "error": reason[0]})
                    print(f"{config:<30} {size:>5} {str(checkpointing):>5} failed: {reason[0]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(r)
                peak = r.get("peak_rss_mb", r.get("peak_gpu_mb"))
                print(f"{config:<30} {size:>5} {r['batch']:>5} {str(checkpointing):>5} {peak:9.0f} "
                      f"{r.get('step_growth_mb', float('nan')):9.0f} {r['step_s']:7.1f}",
                      flush=True)
    write_json_atomic(Path(args.out), {"measurements": results})
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
