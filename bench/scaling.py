"""Training step time and peak memory of the project's UNet against image size.

2D (JS-DDPM widths, batch 8) at 32..256 and 3D (dose widths, batch 1) at 32..128, each with
and without gradient checkpointing, each size in its own process so that its peak RSS is
its own. A size is skipped (and the reason printed) when the previous size predicts that it
would not fit in memory or that one step would take longer than ``--max-step-seconds``.
Besides the measurements, the FLOPs of one step are counted on the meta device, split into
attention and the rest, to show where cost grows faster than the pixel count.

Run from the repository root:
    python -m bench.scaling                     # writes bench/scaling.png
    python -m bench.scaling --dims 2 --precision bf16 --max-step-seconds 30
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

import torch

from bench._common import (
    PRECISIONS,
    THREADS,
    WORKLOADS,
    build_ddpm,
    current_rss_mb,
    make_train_step,
    peak_rss_mb,
    setup_process,
    timed,
    write_json_atomic,
)

SIZES = {2: (32, 64, 128, 256), 3: (32, 48, 64, 96, 128)}
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.json"
PLOT = HERE / "scaling.png"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--steps", type=int, default=2, help="timed steps per size (default 2)")
    p.add_argument("--max-step-seconds", type=float, default=90.0,
                   help="skip sizes predicted to need longer per step (default 90)")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="skip sizes predicted to need more than this share of free memory")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--plot", type=Path, default=PLOT)
    return p.parse_args(argv)


def workload(dims: int, size: int):
    return dataclasses.replace(WORKLOADS[dims], size=size)


def step_flops(dims: int, size: int) -> tuple[float, float]:
    """(total, attention-matrix) FLOPs of one forward + backward pass, on the meta device.

    The second figure is the part quadratic in the token count: q k^T and the weighted sum of
    v (batched matrix products); the q, k, v and output projections are linear and not in it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    w = workload(dims, size)
    with torch.device("meta"):
        model = build_ddpm(w)
        x = torch.zeros(w.batch, w.in_channels, *([size] * dims))
        t = torch.zeros(w.batch, dtype=torch.long)
        token = torch.zeros(w.batch, dtype=torch.long) if w.num_classes else None
    with FlopCounterMode(display=False) as counter:
        model(x, t, token).sum().backward()
    per_op = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in per_op.items()
                    if "bmm" in str(op) or "scaled_dot_product" in str(op))
    return float(counter.get_total_flops()), float(attention)


def measure(conn, dims: int, size: int, checkpointing: bool, precision: str, steps: int,
            threads: int) -> None:
    """Worker process: time ``steps`` training steps after one warm-up step."""
    setup_process(threads=threads)
    w = workload(dims, size)
    torch.manual_seed(0)
    model = build_ddpm(w, gradient_checkpointing=checkpointing)
    baseline = current_rss_mb()
    step = make_train_step(model, w, precision)
    step()
    times = [timed(step) for _ in range(steps)]
    conn.send({"step_s": [wall for wall, _ in times], "step_cpu_s": [cpu for _, cpu in times],
               "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline})


def run_one(dims: int, size: int, checkpointing: bool, args) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=measure, daemon=True, args=(
        child, dims, size, checkpointing, args.precision, args.steps, args.threads))
    process.start()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": f"worker died (exit code {process.exitcode}); out of memory?"}
    process.join(timeout=30)
    return result


def skip_reason(previous: dict | None, row: dict, args) -> str | None:
    """Why ``row``'s size should not run, predicted from the last measured size (or None)."""
    if previous is None or "error" in previous:
        return None
    import psutil

    growth = row["pixels"] / previous["pixels"]
    step_s = statistics.median(previous["step_s"]) * row["flops"] / previous["flops"]
    if step_s > args.max_step_seconds:
        return f"a step would take ~{step_s:.0f} s (> --max-step-seconds {args.max_step_seconds:g})"
    working = previous["peak_rss_mb"] - previous["baseline_rss_mb"]
    need = previous["baseline_rss_mb"] + working * growth
    free = psutil.virtual_memory().available / 2**20
    if need > args.memory_fraction * free:
        return f"needs ~{need / 1024:.1f} GiB, {free / 1024:.1f} GiB free"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for dims in args.dims:
        sizes = SIZES[dims]
        flops = {s: step_flops(dims, s) for s in sizes}
        for checkpointing in (False, True):
            previous = None
            for size in sizes:
                row = {"dims": dims, "size": size, "pixels": size**dims,
                       "checkpointing": checkpointing, "flops": flops[size][0],
                       "attention_flops": flops[size][1]}
                reason = skip_reason(previous, row, args)
                if reason:
                    row["skipped"] = reason
                else:
                    row.update(run_one(dims, size, checkpointing, args))
                rows.append(row)
                print_row(row, args.precision)
                if "skipped" not in row:
                    previous = row
    data = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    write_json_atomic(args.out, data)
    plot(rows, args.plot, args.precision)
    print(f"wrote {args.out} and {args.plot}")
    return 0


def print_row(row: dict, precision: str) -> None:
    name = f"{row['dims']}D {row['size']:>3d}{' ckpt' if row['checkpointing'] else '     '}"
    share = row["attention_flops"] / row["flops"]
    if "skipped" in row:
        print(f"{name} skipped: {row['skipped']}", flush=True)
    elif "error" in row:
        print(f"{name} {row['error']}", flush=True)
    else:
        step = statistics.median(row["step_s"])
        print(f"{name} {precision}: step {step:7.2f} s, peak RSS {row['peak_rss_mb']:7.0f} MiB, "
              f"{row['flops'] / 1e9:7.0f} GFLOP ({share:.1%} in the attention matrix), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)


def plot(rows: list[dict], path: Path, precision: str) -> None:
    """Log-log step time and peak RSS against pixel/voxel count; a slope-1 guide."""
    from ddpm.viz import plt, save_figure

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    colours = {2: "tab:blue", 3: "tab:red"}
    for dims in sorted({r["dims"] for r in rows}):
        for checkpointing in (False, True):
            done = [r for r in rows if r["dims"] == dims and r["checkpointing"] == checkpointing
                    and "step_s" in r]
            if not done:
                continue
            x = [r["pixels"] for r in done]
            style = dict(color=colours[dims], marker="o", linestyle="--" if checkpointing else "-",
                         label=f"{dims}D{' + checkpointing' if checkpointing else ''}")
            ax_time.plot(x, [statistics.median(r["step_s"]) for r in done], **style)
            ax_mem.plot(x, [r["peak_rss_mb"] / 1024 for r in done], **style)
    measured = [r for r in rows if "step_s" in r]
    if measured:  # slope 1: cost proportional to the pixel count, through the smallest 2D point
        first = min(measured, key=lambda r: r["pixels"])
        xs = [first["pixels"], max(r["pixels"] for r in measured)]
        t0 = statistics.median(first["step_s"])
        ax_time.plot(xs, [t0, t0 * xs[1] / xs[0]], color="grey", linestyle=":",
                     label="proportional to pixels")
    for ax, label in ((ax_time, f"training step time, s ({precision})"),
                      (ax_mem, "peak RSS, GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels / voxels per image")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
