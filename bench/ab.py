"""Two versions of the project's UNet, alternated step by step in one process.

``bench/peers.py`` gives each contender its own process, which is right for peak memory and
for foreign libraries, but on a shared machine its single-run ratios move by 10-15%. A small
change to ``ddpm/unet.py`` is judged better here: both versions live in one process with the
same weights and data, and their training steps (and short DDIM runs) alternate, the order
flipping every repetition, so a slow spell of the machine hits both alike.

``--switch`` compares the current code with one of its fast paths switched off instead
(``SWITCHES``): then one model serves both, and only the switch alternates.

    python -m bench.ab --other before=/path/to/old/unet.py --dims 3 --precision fp32
    python -m bench.ab --switch winograd-upsampling-off --reps 12
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def _setting(module, name: str, value):
    """``module.name`` set to ``value`` within the block."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def _winograd_upsampling_off():
    import ddpm.winograd

    return _setting(ddpm.winograd, "MIN_CHANNELS_UPSAMPLE", float("inf"))


def _winograd_off():
    from ddpm.winograd import winograd_enabled

    return winograd_enabled(False)


def _stored_conv_inputs():
    import ddpm.unet

    forward = ddpm.unet.ResBlock.forward

    def storing(self, x, emb, recompute_conv_inputs=True):
        return forward(self, x, emb, recompute_conv_inputs=False)

    return _setting(ddpm.unet.ResBlock, "forward", storing)


def _conv3d_as_conv2d_off():
    import ddpm.convolutions

    return _setting(ddpm.convolutions, "_native_conv3d_is_slow", lambda x, conv: False)


def _winograd_3d_route_off():
    import ddpm.convolutions

    return _setting(ddpm.convolutions, "_winograd_route_pays_off", lambda x, conv: False)


def _winograd_axis_off():
    import ddpm.convolutions

    return _setting(ddpm.convolutions, "axis_winograd_pays_off", lambda *args: False)


# Fast paths that --switch turns off: name -> a context manager factory.
SWITCHES = {
    "winograd-upsampling-off": _winograd_upsampling_off,  # upsample_nearest_conv's direct form
    "winograd-off": _winograd_off,  # every convolution direct
    "stored-conv-inputs": _stored_conv_inputs,  # ResBlocks store their conv inputs
    "conv3d-as-conv2d-off": _conv3d_as_conv2d_off,  # batch-1 3D levels on PyTorch's kernel
    "winograd-3d-route-off": _winograd_3d_route_off,  # wide batch-1 3D layers on oneDNN
    "winograd-axis-off": _winograd_axis_off,  # no F(4, 3) along the depth axis
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    versus = p.add_mutually_exclusive_group(required=True)
    versus.add_argument("--other", metavar="LABEL=PATH",
                        help="the unet.py to compare the current one with")
    versus.add_argument("--switch", choices=sorted(SWITCHES),
                        help="compare with the current code with this fast path off")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--reps", type=int, default=6, help="alternations (default 6)")
    p.add_argument("--ddim-steps", type=int, default=3,
                   help="DDIM steps per repetition; 0 skips sampling (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.reps < 1 or args.ddim_steps < 0:
        p.error("--reps must be >= 1 and --ddim-steps >= 0")
    if args.switch:
        args.label, args.path = args.switch, None
        return args
    label, sep, path = args.other.partition("=")
    if not sep or not label or not Path(path).is_file():
        p.error(f"--other expects LABEL=PATH to an existing unet.py, got {args.other!r}")
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
    versions = {"current": contextlib.nullcontext,
                args.label: SWITCHES[args.switch] if args.switch else contextlib.nullcontext}
    models, steps = {}, {}
    for name in versions:
        if args.switch and models:  # one model; only the switch differs
            models[name], steps[name] = models["current"], steps["current"]
        else:
            torch.manual_seed(0)
            models[name] = build_ddpm(w, args.path if name == args.label else None)
            steps[name] = make_train_step(models[name], w, args.precision)
        for _ in range(2):  # warm-up
            with versions[name]():
                steps[name]()
    train = {name: [] for name in versions}
    ddim = {name: [] for name in versions}
    for rep in range(args.reps):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            with versions[name]():
                train[name].append(seconds(steps[name]))
        for name in order if args.ddim_steps else ():
            with versions[name]():
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
