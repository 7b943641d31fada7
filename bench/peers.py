"""The project's UNet against diffusers' UNet2DModel and MONAI's DiffusionModelUNet.

Every contender is built at the same widths and depth (parameter counts within 10%), gets the
same synthetic batches and runs in its own process, so its peak RSS is its own. Rounds are
interleaved (A, B, C, A, B, C, ...) so that a busy machine slows every contender alike.
Measured per contender: training samples/s (median over timed steps after warm-up), the time
of one 50-step DDIM run through ``ddpm.sampling.sample``, and the process's peak RSS.

Run from the repository root:
    python -m bench.peers                          # 2D and 3D, fp32 and bf16
    python -m bench.peers --quick --dims 2 --precision fp32
    python -m bench.peers --unet-variant head=/tmp/unet_head.py   # before/after a change
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from bench._common import (
    CHECKPOINTING,
    CONTIGUOUS,
    PEERS,
    PRECISIONS,
    THREADS,
    WORKLOADS,
    bf16_supported,
    build_contender,
    current_rss_mb,
    machine_info,
    make_train_step,
    parameter_count,
    peak_rss_mb,
    run_ddim,
    setup_process,
    timed,
    write_json_atomic,
)

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="bf16 is skipped (and said so) where the CPU has no bf16 kernels")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, help="timed training steps per round (default 3)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default 2)")
    p.add_argument("--ddim-steps", type=int, help="DDIM steps (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="defaults of 2 rounds of 2 steps, 1 warm-up step, 10 DDIM steps")
    p.add_argument("--contenders", nargs="+", default=None, choices=("ddpm", "diffusers", "monai"),
                   help="subset of ddpm, diffusers, monai (default: all for the dims)")
    p.add_argument("--unet-variant", action="append", default=[], metavar="LABEL=PATH",
                   help="also run the UNet of another unet.py as contender ddpm[LABEL]")
    p.add_argument("--contiguous-variant", action="store_true",
                   help=f"also run {CONTIGUOUS}: the UNet in the contiguous layout")
    p.add_argument("--checkpointing-variant", action="store_true",
                   help=f"also run {CHECKPOINTING}: the UNet with gradient checkpointing")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormals (see bench/README.md)")
    p.add_argument("--malloc-default", action="store_true",
                   help="keep glibc's default malloc thresholds instead of "
                        "ddpm.runtime.reuse_freed_memory (see bench/README.md)")
    p.add_argument("--omp-wait-policy", choices=("default", "passive", "active"),
                   default="default",
                   help="OpenMP idle threads: the runtime's default (spin briefly, then "
                        "sleep; what users get), always sleep (passive) or always spin (active)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"torch threads per contender (default {THREADS})")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    defaults = (2, 2, 1, 10) if args.quick else (3, 3, 2, 50)
    for name, default in zip(("rounds", "steps", "warmup", "ddim_steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.rounds, args.steps, args.ddim_steps) < 1 or args.warmup < 0:
        p.error("--rounds, --steps and --ddim-steps must be >= 1, --warmup >= 0")
    variants = {}
    for item in args.unet_variant:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            p.error(f"--unet-variant expects LABEL=PATH to an existing unet.py, got {item!r}")
        variants[f"ddpm[{label}]"] = path
    args.variants = variants
    return args


# ----------------------------------------------------------------------------- worker


def serve(conn, name: str, unet_path: str | None, dims: int, precision: str,
          settings: dict) -> None:
    """Worker process: build one contender, then answer train / sample / stop requests.
    ``settings``: the keyword arguments of ``setup_process``, alike for every contender."""
    setup_process(**settings)
    # Every worker imports the same libraries, so the baseline memory is alike.
    for lib in ("diffusers", "monai"):
        try:
            __import__(lib)
        except ImportError:
            pass
    import torch

    w = WORKLOADS[dims]
    torch.manual_seed(0)
    try:
        model = build_contender(name, w, unet_path)
    except Exception as error:  # reported to the parent, which carries on without it
        conn.send({"error": f"{type(error).__name__}: {error}"})
        return
    conn.send({"params": parameter_count(model), "rss_after_build_mb": current_rss_mb()})
    step = make_train_step(model, w, precision)
    train_peak = None
    while True:
        command, arg = conn.recv()
        if command == "train":
            warmup, steps = arg
            for _ in range(warmup):
                step()
            times = [timed(step) for _ in range(steps)]
            train_peak = peak_rss_mb()
            conn.send({"times": times})
        elif command == "sample":
            steps, warmup = arg
            if warmup:
                run_ddim(model, w, precision, 2)
            conn.send({"times": [timed(functools.partial(run_ddim, model, w, precision, steps))]})
        elif command == "stop":
            conn.send({"peak_rss_mb": peak_rss_mb(), "train_peak_rss_mb": train_peak})
            return


class Contender:
    """The parent's handle on one worker process."""

    def __init__(self, ctx, name: str, unet_path: str | None, dims: int, precision: str,
                 settings: dict):
        self.name, self.precision = name, precision
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=serve, daemon=True,
            args=(child, name, unet_path, dims, precision, settings))
        self.process.start()
        self.error = None
        self.info = self.ask(None)
        self.train, self.train_cpu, self.ddim, self.ddim_cpu = [], [], [], []

    def ask(self, request):
        if self.error:
            return None
        try:
            if request is not None:
                self.conn.send(request)
            reply = self.conn.recv()
        except (EOFError, OSError):
            reply = {"error": f"worker died (exit code {self.process.exitcode}); out of memory?"}
        if "error" in reply:
            self.error = reply["error"]
            print(f"  {self.name} {self.precision}: {self.error}", file=sys.stderr)
            return None
        return reply


# ----------------------------------------------------------------------------- parent


def run_block(args, dims: int, precision: str, names: list[str]) -> dict:
    """All contenders of one workload and precision, interleaved round by round."""
    w = WORKLOADS[dims]
    ctx = mp.get_context("spawn")
    print(f"\n== {w.describe()} | {precision} | {args.threads} threads | {args.rounds} rounds x "
          f"{args.steps} steps, DDIM {args.ddim_steps} steps | load {os.getloadavg()[0]:.1f}",
          flush=True)
    settings = dict(flush_denormal=not args.keep_denormals, threads=args.threads,
                    reuse_memory=not args.malloc_default)
    contenders = [Contender(ctx, n, args.variants.get(n), dims, precision, settings)
                  for n in names]
    live = [c for c in contenders if not c.error]
    start = time.perf_counter()
    for r in range(args.rounds):
        for c in live:
            reply = c.ask(("train", (args.warmup if r == 0 else 0, args.steps)))
            if reply:
                c.train += [wall for wall, _ in reply["times"]]
                c.train_cpu += [cpu for _, cpu in reply["times"]]
        for c in live:
            reply = c.ask(("sample", (args.ddim_steps, r == 0)))
            if reply:
                c.ddim += [wall for wall, _ in reply["times"]]
                c.ddim_cpu += [cpu for _, cpu in reply["times"]]
        print(f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s, "
              f"load {os.getloadavg()[0]:.1f})", flush=True)
    results = {}
    for c in contenders:
        final = c.ask(("stop", None)) or {}
        c.process.join(timeout=30)
        if c.error:
            results[c.name] = {"error": c.error}
            continue
        step_s = statistics.median(c.train)
        results[c.name] = {
            "params": c.info["params"],
            "train_step_s": c.train, "train_step_cpu_s": c.train_cpu,
            "train_samples_per_s": w.batch / step_s,
            "train_samples_per_cpu_s": w.batch / statistics.median(c.train_cpu),
            "ddim_s": c.ddim, "ddim_cpu_s": c.ddim_cpu,
            "ddim_median_s": statistics.median(c.ddim),
            "peak_rss_mb": final.get("peak_rss_mb"),
            "train_peak_rss_mb": final.get("train_peak_rss_mb"),
            "rss_after_build_mb": c.info["rss_after_build_mb"],
        }
    add_ratios(results, [n for n in names if n in PEERS[dims]])
    print_table(results)
    return {"dims": dims, "precision": precision, "workload": w.describe(),
            "load_average_end": os.getloadavg(), "contenders": results}


def add_ratios(results: dict, peers: list[str]) -> None:
    """Each figure over the best peer's (samples/s: higher is better; time, RSS: lower)."""
    ok = {n: r for n, r in results.items() if "error" not in r}
    reference = [n for n in peers if n in ok] or list(ok)[:1]
    if not reference:
        return
    best = {
        "train_samples_per_s": max(ok[n]["train_samples_per_s"] for n in reference),
        "train_samples_per_cpu_s": max(ok[n]["train_samples_per_cpu_s"] for n in reference),
        "ddim_median_s": min(ok[n]["ddim_median_s"] for n in reference),
        "peak_rss_mb": min(ok[n]["peak_rss_mb"] for n in reference),
    }
    for r in ok.values():
        r["ratio_to_best_peer"] = {k: r[k] / v for k, v in best.items()}
    counts = [r["params"] for r in ok.values()]
    if max(counts) > 1.1 * min(counts):
        print(f"  WARNING: parameter counts differ by more than 10%: {counts}", file=sys.stderr)


def print_table(results: dict) -> None:
    print(f"  {'contender':16s} {'params':>8s} {'train samples/s':>19s} "
          f"{'(per CPU-s)':>17s} {'DDIM s':>15s} {'peak RSS MiB':>18s}")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:16s} {r['error']}")
            continue
        q = r.get("ratio_to_best_peer", {})
        print(f"  {name:16s} {r['params'] / 1e6:7.2f}M "
              f"{r['train_samples_per_s']:9.2f} ({q.get('train_samples_per_s', 1):5.2f}x) "
              f"{r['train_samples_per_cpu_s']:8.2f} ({q.get('train_samples_per_cpu_s', 1):5.2f}x)"
              f" {r['ddim_median_s']:7.1f} ({q.get('ddim_median_s', 1):5.2f}x) "
              f"{r['peak_rss_mb']:9.0f} ({q.get('peak_rss_mb', 1):5.2f}x)", flush=True)


def bf16_speedups(blocks: list[dict]) -> dict:
    """Per workload and contender: fp32 time over bf16 time, training and DDIM."""
    by_key = {(b["dims"], b["precision"]): b["contenders"] for b in blocks}
    out = {}
    for dims in sorted({b["dims"] for b in blocks}):
        fp32, bf16 = by_key.get((dims, "fp32")), by_key.get((dims, "bf16"))
        if not fp32 or not bf16:
            continue
        for name in fp32:
            a, b = fp32[name], bf16.get(name, {})
            if "error" in a or not b or "error" in b:
                continue
            out[f"{dims}D {name}"] = {
                "train": b["train_samples_per_s"] / a["train_samples_per_s"],
                "ddim": a["ddim_median_s"] / b["ddim_median_s"],
            }
    if out:
        print("\n== bf16 autocast speed-up over fp32 (same contender, separate blocks)")
        for key, s in out.items():
            print(f"  {key:22s} train {s['train']:5.2f}x   DDIM {s['ddim']:5.2f}x")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # Read by the OpenMP runtime when it loads, so it must be set before the workers start.
    # PASSIVE makes every parallel region wake sleeping threads: it slowed ddpm's training
    # step by 1.4x and diffusers' by 1.0x in one measurement, so it is not the default here.
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    precisions = list(args.precision)
    if "bf16" in precisions and not bf16_supported():
        print("bf16 skipped: this CPU has no native bf16 kernels (AVX512-BF16 / AMX)")
        precisions.remove("bf16")
    blocks = []
    for dims in args.dims:
        names = ["ddpm", *args.variants, *([CONTIGUOUS] if args.contiguous_variant else []),
                 *([CHECKPOINTING] if args.checkpointing_variant else []), *PEERS[dims]]
        if args.contenders:
            names = [n for n in names if n.split("[")[0] in args.contenders]
        for precision in precisions:
            blocks.append(run_block(args, dims, precision, names))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "unet_variant")}
    data = {"machine": machine_info(), "settings": settings, "blocks": blocks,
            "bf16_speedup": bf16_speedups(blocks)}
    write_json_atomic(args.out, data)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
