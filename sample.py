"""Generate slices (image + lesion mask) from a trained checkpoint.

    python sample.py --checkpoint runs/quickstart/checkpoints/last.pt --out samples/
    python sample.py --checkpoint last.pt --z-bins 2-7 --pathology 1 -n 8 --steps 100 --seed 3

Writes into ``--out``: ``grid.png`` (one row per condition, the lesion mask outlined in red),
``samples.npz`` (samples (N, 2, H, W) in [-1, 1], z_bins, pathology, tokens, seed and the
settings) and per condition ``binBB_{healthy,lesion}_{image,mask}.nii.gz`` of shape
(H, W, 1, n): the n samples of that condition as one slice each, with the cache's RAS
affine placed at the bin's centre z. Geometry, z-bins and image size come from the
checkpoint, never from a config file. Same seed (and batch size) -> same samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.generation import (
    condition_label,
    condition_list,
    expand_conditions,
    generate,
    load_trained,
    parse_pathology,
    parse_z_bins,
    postprocess,
    save_arrays,
    save_nifti,
)
from ddpm.viz import sample_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--z-bins", default="all",
                   help="bins to sample: 'all', a list '0,3,5', a range '2-7' (default all)")
    p.add_argument("--pathology", default="both", help="0 (healthy), 1 (lesion) or both")
    p.add_argument("-n", "--n-per-condition", type=int, default=4, help="samples per condition")
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's "
                   "sample.steps)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: checkpoint's setting")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample with the EMA weights (default) or, --no-ema, the live ones")
    p.add_argument("--batch-size", type=int, default=64, help="samples per sampler batch")
    p.add_argument("--no-blank-background", action="store_true",
                   help="keep pixels outside the z-bin's prior head mask (default: set to -1)")
    p.add_argument("--no-binarise-mask", action="store_true",
                   help="keep the soft mask channel (default: +1 where > 0, else -1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.n_per_condition < 1:
        print("error: -n must be >= 1", file=sys.stderr)
        return 2
    try:
        tm = load_trained(args.checkpoint, device=args.device)
        conditions = condition_list(parse_z_bins(args.z_bins, tm.n_bins),
                                    parse_pathology(args.pathology))
        z_bins, pathology = expand_conditions(conditions, args.n_per_condition)
        weights = "ema" if args.ema else "live"
        raw = generate(tm, z_bins, pathology, weights=weights, steps=args.steps,
                       sampler=args.sampler, eta=args.eta, guidance=args.guidance,
                       seed=args.seed, batch_size=args.batch_size,
                       progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x = postprocess(raw, z_bins, tm.priors, blank_background=not args.no_blank_background,
                    binarise_mask=not args.no_binarise_mask)
    out = Path(args.out)
    n = args.n_per_condition
    s = tm.cfg.sample
    settings = dict(seed=args.seed, weights=weights, steps=args.steps or s.steps,
                    sampler=args.sampler or s.sampler, eta=s.eta if args.eta is None else args.eta,
                    guidance=s.guidance if args.guidance is None else args.guidance,
                    blank_background=not args.no_blank_background,
                    binarise_mask=not args.no_binarise_mask, checkpoint=str(args.checkpoint))
    save_arrays(out / "samples.npz", x, z_bins, pathology, tm.n_bins, **settings)
    niftis = save_nifti(out, x, z_bins, pathology, tm.meta)
    grid = sample_grid(x.reshape(len(conditions), n, *x.shape[1:]),
                       [condition_label(b, p) for b, p in conditions], out / "grid.png",
                       title=f"{weights.upper()} samples, {settings['sampler']} "
                             f"{settings['steps']} steps, seed {args.seed}")
    print(f"{len(x)} samples ({len(conditions)} conditions x {n}) from {args.checkpoint} "
          f"(step {tm.step}, {weights} weights) -> {out}")
    print(f"  {grid.name}, samples.npz, {len(niftis)} NIfTI files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
