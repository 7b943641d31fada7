"""Two versions of the project's UNet, alternated step by step in one process.

``bench/peers.py`` gives each contender its own process, which is right for peak memory and
for foreign libraries, but on a shared machine its single-run ratios move by 10-15%. A small
change to ``ddpm/unet.py`` is judged better here: both versions live in one process with the
same weights and data, and their training steps (and short DDIM runs) alternate, the order
flipping every repetition, so a slow spell of the machine hits both alike.

    python -m bench.ab --other before=/path/to/old/unet.py --dims 3 --precision fp32
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._common import (
    PRECISIONS,
    WORKLOADS,
    build_ddpm,
    machine_info,
    make_train_step,
    run_ddim,
    setup_process,
    write_json_atomic,
)

RESULTS = Path(__file__).resolve().parent / "results" / "ab.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, metavar="LABEL=PATH",
                   help="the unet.py to compare the current one with")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--reps", type=int, default=6, help="alternations (default 6)")
    p.add_argument("--ddim-steps", type=int, default=3,
                   help="DDIM steps per repetition; 0 skips sampling (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    label, sep, path = args.other.partition("=")
    if not sep or not label or not Path(path).is_file():
        p.error(f"--other expects LABEL=PATH to an existing unet.py, got {args.other!r}")
    if args.reps < 1 or args.ddim_steps < 0:
        p.error("--reps must be >= 1 and --ddim-steps >= 0")
    args.label, args.path = label, path
    return args


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speedups(current: list[float], other: list[float]) -> list[float]:
    """other / current time for each alternation: > 1 where the current version was faster."""
    return [o / c for c, o in zip(current, other)]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_process()
    w = WORKLOADS[args.dims]
    versions = {"current": None, args.label: args.path}
    models, steps = {}, {}
    for name, path in versions.items():
        torch.manual_seed(0)
        models[name] = build_ddpm(w, path)
        steps[name] = make_train_step(models[name], w, args.precision)
        for _ in range(2):  # warm-up
            steps[name]()
    train = {name: [] for name in versions}
    ddim = {name: [] for name in versions}
    for rep in range(args.reps):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            train[name].append(seconds(steps[name]))
        for name in order if args.ddim_steps else ():
            run = seconds(functools.partial(run_ddim, models[name], w, args.precision,
                                            args.ddim_steps))
            ddim[name].append(run / args.ddim_steps)
    result = {name: {"train_step_s": train[name], "ddim_step_s": ddim[name]} for name in versions}
    print(f"{w.describe()} | {args.precision} | {args.reps} alternations")
    for name in versions:
        line = f"  {name:12s} train step {statistics.median(train[name]):.3f} s"
        if args.ddim_steps:
            line += f"   DDIM step {statistics.median(ddim[name]):.3f} s"
        print(line)
    # Each alternation gives one speed-up measured at one moment of the machine; their median
    # is robust to the machine drifting between alternations.
    paired = {"train": speedups(train["current"], train[args.label])}
    if args.ddim_steps:
        paired["ddim"] = speedups(ddim["current"], ddim[args.label])
    ratios = {k: statistics.median(v) for k, v in paired.items()}
    print(f"  current is, as fast as {args.label} (median over alternations, range): "
          + ", ".join(f"{k} {ratios[k]:.2f}x ({min(v):.2f}-{max(v):.2f})"
                      for k, v in paired.items()))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json_atomic(args.out, {"machine": machine_info(), "settings": settings,
                                 "results": result, "speedup_of_current": ratios,
                                 "speedup_per_alternation": paired})
    return 0


if __name__ == "__main__":
    sys.exit(main())
