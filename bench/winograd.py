"""Winograd F(4x4, 3x3) convolutions against PyTorch's direct ones, layer by layer.

For each shape, ``ddpm.winograd.winograd_conv2d`` and ``F.conv2d`` alternate in one process
(the order flipping every repetition), forward alone and forward + backward, float32,
channels-last; the table gives the median of the per-repetition speed-ups and whether
``winograd_pays_off`` routes the shape to Winograd. Also the largest error of each against
a float64 convolution, relative to the largest output. The shapes are the UNet's layers in
``bench/peers.py``'s workloads plus a sweep over width and block count, which is where the
thresholds in ``ddpm/winograd.py`` come from.

The upsampling form (``winograd_conv2d(..., upsample=True)``: the convolution of the
nearest-neighbour doubled input) is measured against ``upsample_nearest_conv``'s direct form,
the 2x2 convolution at the input's resolution that the UNet would use otherwise. Batch-1 3D
layers computed as one 2D convolution over the depth slices (``conv3d_as_conv2d``, Winograd
where routed) are measured against PyTorch's conv3d; "routed" there says whether ``Conv3d``
takes that route. F(4, 3) along the first spatial axis (``ddpm.winograd_axis``) is measured
against what ``Conv2d``/``Conv3d`` compute without it; "routed" there says whether they take it.

    python -m bench.winograd
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._common import machine_info, setup_process, write_json_atomic
from bench.ab import SWITCHES
from ddpm.convolutions import (
    Conv2d,
    Conv3d,
    _winograd_route_pays_off,
    conv3d_as_conv2d,
    upsample_nearest_conv,
)
from ddpm.winograd import winograd_conv2d, winograd_enabled, winograd_pays_off
from ddpm.winograd_axis import axis_winograd_conv, axis_winograd_pays_off

RESULTS = Path(__file__).resolve().parent / "results" / "winograd.json"

# (batch, C_in, C_out, size); the first rows are the 2D workload's levels 1 and 2 and the 3D
# workload's level 2 as conv3d_as_conv2d computes it (12 depth slices, 3 x 128 outputs).
SHAPES = [
    (8, 128, 128, 32), (8, 384, 128, 32), (8, 256, 256, 16), (8, 512, 256, 16),
    (12, 128, 384, 12),
    (8, 64, 64, 64), (8, 128, 64, 64), (8, 128, 128, 64), (16, 128, 128, 32),
    (16, 256, 256, 16), (1, 256, 256, 16), (8, 256, 256, 8), (2, 128, 128, 13),
]
# Upsampling layers, (batch, C, C, input size): the 2D workload's two, then a sweep.
UPSAMPLE_SHAPES = [
    (8, 256, 256, 16), (8, 128, 128, 32),
    (8, 128, 128, 16), (16, 256, 256, 16), (2, 256, 256, 16), (8, 256, 256, 32),
    (8, 64, 64, 32), (8, 256, 256, 8),
]

# Batch-1 3D layers, (C_in, C_out, size): the 3D workload's wide decoder layers at 12^3 and
# 24^3, and narrower ones the routing turns down.
ROUTE_3D_SHAPES = [(256, 128, 12), (384, 128, 12), (192, 128, 12), (192, 64, 24),
                   (128, 64, 24), (96, 64, 24), (64, 64, 24)]

# F(4, 3) along the first axis, (batch, C_in, C_out, size, dims): the 3D workload's levels 0
# and 1 (48^3, 24^3), the 2D workload's level 0 (64^2), then shapes the rule turns down.
AXIS_SHAPES = [(1, 32, 32, 48, 3), (1, 64, 32, 48, 3), (1, 96, 32, 48, 3), (1, 64, 64, 24, 3),
               (1, 128, 64, 24, 3), (1, 32, 64, 24, 3), (8, 64, 64, 64, 2),
               (8, 128, 64, 64, 2), (8, 192, 64, 64, 2),
               (1, 16, 16, 48, 3), (1, 32, 32, 16, 3), (8, 64, 64, 32, 2)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9, help="alternations per shape (default 9)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


def measure(shape, reps: int, upsample: bool = False) -> dict:
    n, c_in, c_out, size = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, size, size, generator=g).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / math.sqrt(9 * c_in)).requires_grad_()
    b = torch.randn(c_out, generator=g).requires_grad_()
    out_size = 2 * size if upsample else size
    grad = torch.randn(n, c_out, out_size, out_size, generator=g).contiguous(
        memory_format=torch.channels_last)
    if upsample:
        def direct():
            with winograd_enabled(False):
                return upsample_nearest_conv(x, w, b)
        reference = F.conv2d(F.interpolate(x.double(), scale_factor=2, mode="nearest"),
                             w.double(), b.double(), padding=1)
    else:
        direct = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
        reference = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    winograd = lambda: winograd_conv2d(x, w, b, upsample=upsample)  # noqa: E731
    row = {"shape": list(shape), "upsample": upsample,
           "routed": winograd_pays_off(x, w, (1, 1), (1, 1), (1, 1), 1, upsample=upsample),
           "error_direct": relative_error(direct(), reference),
           "error_winograd": relative_error(winograd(), reference)}
    row.update(alternated(direct, winograd, (x, w, b), grad, reps))
    return row


def alternated(direct, fast, inputs, grad, reps: int) -> dict:
    """Speed-ups of ``fast`` over ``direct`` (both called without arguments), forward alone
    and forward + backward into ``inputs``: median and range over ``reps`` alternations."""
    result = {}
    for label, wrap in (("forward", lambda f: f),
                        ("training", lambda f: lambda: torch.autograd.grad(f(), inputs, grad))):
        a, c = wrap(direct), wrap(fast)
        for _ in range(2):  # warm-up
            a(), c()
        speedups = []
        for rep in range(reps):
            first, second = (a, c) if rep % 2 == 0 else (c, a)
            t_first, t_second = seconds(first), seconds(second)
            t_direct, t_fast = (t_first, t_second) if first is a else (t_second, t_first)
            speedups.append(t_direct / t_fast)
        result[label] = {"median": statistics.median(speedups), "min": min(speedups),
                         "max": max(speedups)}
    return result


def measure_3d_route(shape, reps: int) -> dict:
    """A batch-1 3x3x3 convolution by ``conv3d_as_conv2d`` (whose 2D convolution takes
    Winograd where ``winograd_pays_off`` says so) against PyTorch's conv3d."""
    c_in, c_out, size = shape
    g = torch.Generator().manual_seed(0)
    conv = Conv3d(c_in, c_out, 3, padding=1)
    x = torch.randn(1, c_in, size, size, size, generator=g).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_()
    w, b = conv.weight, conv.bias
    grad = torch.randn(1, c_out, size, size, size, generator=g).contiguous(
        memory_format=torch.channels_last_3d)
    direct = lambda: F.conv3d(x, w, b, padding=1)  # noqa: E731
    route = lambda: conv3d_as_conv2d(x, w, b)  # noqa: E731
    reference = F.conv3d(x.double(), w.double(), b.double(), padding=1)
    row = {"shape": list(shape), "routed": _winograd_route_pays_off(x, conv),
           "error_direct": relative_error(direct(), reference),
           "error_winograd": relative_error(route(), reference)}
    row.update(alternated(direct, route, (x, w, b), grad, reps))
    return row


def measure_axis(shape, reps: int) -> dict:
    """``axis_winograd_conv`` against the module's convolution without it."""
    n, c_in, c_out, size, dims = shape
    g = torch.Generator().manual_seed(0)
    conv = (Conv2d if dims == 2 else Conv3d)(c_in, c_out, 3, padding=1)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(n, c_in, *(size,) * dims, generator=g).contiguous(
        memory_format=layout).requires_grad_()
    w, b = conv.weight, conv.bias
    grad = torch.randn(n, c_out, *(size,) * dims, generator=g).contiguous(memory_format=layout)

    def without():
        with SWITCHES["winograd-axis-off"]():
            return conv(x)

    axis = lambda: axis_winograd_conv(x, w, b)  # noqa: E731
    direct = F.conv2d if dims == 2 else F.conv3d
    reference = direct(x.double(), w.double(), b.double(), padding=1)
    row = {"shape": list(shape),
           "routed": axis_winograd_pays_off(x, w, conv.stride, conv.padding, conv.dilation, 1),
           "error_direct": relative_error(without(), reference),
           "error_winograd": relative_error(axis(), reference)}
    row.update(alternated(without, axis, (x, w, b), grad, reps))
    return row


def print_row(label: str, row: dict) -> None:
    f, t = row["forward"], row["training"]
    routed = "yes" if row["routed"] else "no"
    print(f"{label}  {routed:>6}"
          f"  {f['median']:.2f}x ({f['min']:.2f}-{f['max']:.2f})"
          f"  {t['median']:.2f}x ({t['min']:.2f}-{t['max']:.2f})"
          f"  {row['error_direct']:.1e} / {row['error_winograd']:.1e}", flush=True)


def table(title: str, shapes, measure_one) -> list[dict]:
    """Print ``title``, then one row per (batch, C_in, C_out, size, dims) shape."""
    print(title)
    rows = []
    for shape in shapes:
        rows.append(measure_one(shape))
        n, c_in, c_out, size, dims = shape
        print_row(f"{n:>6} x {c_in:>3} -> {c_out:>3} x {size:>3}^{dims}", rows[-1])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_process()
    print(f"{'N x C_in -> C_out x S^2':>26}  routed  forward           fwd+bwd"
          "           error direct / Winograd")
    rows = []
    jobs = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in UPSAMPLE_SHAPES]
    for shape, upsample in jobs:
        if upsample and not rows[-1]["upsample"]:
            print("upsampling: the convolution of the doubled input (input size given), "
                  "against upsample_nearest_conv's direct form")
        row = measure(shape, args.reps, upsample)
        rows.append(row)
        n, c_in, c_out, size = shape
        print_row(f"{n:>6} x {c_in:>3} -> {c_out:>3} x {size:>3}^2", row)
    rows_3d = table("3D, batch 1: conv3d_as_conv2d (Winograd where routed) against PyTorch's "
                    "conv3d", [(1, *shape, 3) for shape in ROUTE_3D_SHAPES],
                    lambda shape: measure_3d_route(shape[1:4], args.reps))
    rows_axis = table("F(4, 3) along the first axis (ddpm.winograd_axis) against Conv2d/Conv3d "
                      "without it", AXIS_SHAPES, lambda shape: measure_axis(shape, args.reps))
    write_json_atomic(args.out, {"machine": machine_info(), "reps": args.reps, "rows": rows,
                                 "rows_3d_route": rows_3d, "rows_axis": rows_axis})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
