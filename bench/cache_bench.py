"""Throughput of the data pipeline: building the slice cache and reading it back.

    python bench/cache_bench.py                      # 24 phantoms at 64^3, 3 repeats
    python bench/cache_bench.py --subjects 48 --size 96 --repeats 5

Build: subjects/s and slices/s of ``build_cache`` (phantom generation excluded: the phantoms
are generated once before timing). Read: samples/s of one shuffled epoch of ``SliceDataset``
through a ``DataLoader`` (batch 16) for each worker count, workers kept alive between epochs
and a warm-up epoch first. Every number is the median over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm.caching import build_cache  # noqa: E402
from ddpm.config import DataConfig  # noqa: E402
from ddpm.data import SliceDataset  # noqa: E402
from ddpm.phantoms import generate_brain_phantoms  # noqa: E402


def bench_build(cfg: DataConfig, repeats: int) -> tuple[float, int]:
    """Median build seconds and the number of slices written."""
    times, slices = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        summary = build_cache(cfg, progress=False)
        times.append(time.perf_counter() - start)
        slices = sum(s["slices"] for s in summary.splits.values())
    return statistics.median(times), slices


def bench_read(cache_dir: Path, workers: int, repeats: int, batch_size: int) -> float:
    """Median samples/s of shuffled epochs over the training split."""
    dataset = SliceDataset(cache_dir, "train")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    rates = []
    for epoch in range(repeats + 1):
        start = time.perf_counter()
        n = sum(len(batch["x"]) for batch in loader)
        if epoch:  # epoch 0 warms up the page cache and starts the workers
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="phantom edge length (voxels)")
    parser.add_argument("--image-size", type=int, default=None, help="default: --size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        margin = args.size // 8
        cfg = DataConfig(source="phantom", root=f"{tmp}/phantoms", n_subjects=args.subjects,
                         phantom_size=args.size, cache_dir=f"{tmp}/cache",
                         image_size=args.image_size or args.size,
                         z_range=[margin, args.size - margin - 1])
        generate_brain_phantoms(cfg.root, n_subjects=args.subjects, size=args.size,
                                seed=cfg.phantom_seed, progress=False)
        seconds, slices = bench_build(cfg, args.repeats)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{args.subjects} phantoms at {args.size}^3 -> {slices} slices of "
              f"{cfg.image_size}^2, median of {args.repeats}")
        print(f"build: {seconds:.2f} s  {args.subjects / seconds:.1f} subjects/s  "
              f"{slices / seconds:.0f} slices/s")
        for workers in args.workers:
            rate = bench_read(Path(cfg.cache_dir), workers, args.repeats, args.batch_size)
            print(f"read (batch {args.batch_size}, shuffled, workers={workers}): "
                  f"{rate:.0f} samples/s")


if __name__ == "__main__":
    main()
