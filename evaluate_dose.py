"""Evaluate dose-prediction checkpoints side by side, with the steps and ensemble ablations.

    python evaluate_dose.py --checkpoint runs/dose3d_regression_quick/checkpoints/last.pt \\
        runs/dose3d_ddpm_quick/checkpoints/last.pt runs/dose3d_flow_quick/checkpoints/last.pt \\
        --out eval/dose_quick --steps 10,25,50,100,250 --ensemble 1,3,5

Every patient of the split (``--max-patients`` the first N) is predicted as a whole volume,
window by window at every sampler step. Written into ``--out``: comparison.csv (MAE in the
body, DVH score, gamma pass rates 3%/3 mm and 2%/2 mm, seconds per patient; one row per
checkpoint), per_patient.csv, dvh_errors.csv, steps_ablation.csv/.png and
ensemble_ablation.csv/.png for the diffusion and flow checkpoints, doses_<patient>.png,
summary.md and metrics.json. The cache is the checkpoints' own (or ``--cache-dir``) and is
refused when it differs from the data they were trained on.
"""

from __future__ import annotations

import argparse
import sys

from ddpm.caching import StaleCacheError
from ddpm.config import ConfigError
from ddpm.dose_eval import GENERATIVE, DoseEvalSettings, evaluate_dose, summary_markdown


def int_list(text: str) -> list[int]:
    """``"10,25,50"`` -> [10, 25, 50]; every value a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more dose checkpoints (.pt), e.g. regression, diffusion, flow")
    p.add_argument("--name", nargs="+", help="table labels, one per checkpoint (default: run "
                   "names)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--cache-dir", help="the dose cache, when it moved (default: the "
                   "checkpoints' dose.cache_dir)")
    p.add_argument("--max-patients", type=int, help="evaluate the first N patients only")
    p.add_argument("--steps", type=int_list, default=[], metavar="LIST",
                   help="steps ablation, e.g. 10,25,50,100,250,1000 (default: none)")
    p.add_argument("--ensemble", type=int_list, default=[], metavar="LIST",
                   help="ensemble ablation, e.g. 1,3,5,10 (default: none)")
    p.add_argument("--ablation-samples", type=int, default=2,
                   help="samples per step count in the steps ablation (default 2)")
    p.add_argument("--ablate", type=lambda s: tuple(s.split(",")), default=GENERATIVE,
                   help="objectives the ablations run for (default diffusion,flow)")
    p.add_argument("--default-steps", type=int, help="steps of the comparison and ensemble "
                   "(default: each checkpoint's sample.steps)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="predict with the EMA weights (default) or --no-ema the live ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--dose", action="store_true", help=argparse.SUPPRESS)  # evaluate.py hook
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.name and len(args.name) != len(args.checkpoint):
        p.error(f"--name gives {len(args.name)} labels for {len(args.checkpoint)} checkpoints")
    unknown = set(args.ablate) - set(GENERATIVE)
    if unknown:
        p.error(f"--ablate: unknown objective(s) {sorted(unknown)}; choose from {GENERATIVE}")
    if args.ablation_samples < 1:
        p.error("--ablation-samples must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = DoseEvalSettings(
        split=args.split, max_patients=args.max_patients, steps=args.steps,
        ensemble=args.ensemble, ablation_samples=args.ablation_samples, ablate=args.ablate,
        default_steps=args.default_steps, weights="ema" if args.ema else "live", seed=args.seed)
    try:
        metrics = evaluate_dose(args.checkpoint, args.out, settings, cache_dir=args.cache_dir,
                                device=args.device, names=args.name,
                                progress=not args.no_progress)
    except (FileNotFoundError, StaleCacheError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_markdown(metrics))
    for row in metrics["steps_vs_default"]:
        print(f"{row['model']}: MAE at {row['steps']} steps {row['mae_gy']:.3f} Gy, "
              f"{100 * row['relative_change']:+.1f}% vs {row['default_steps']} steps")
    print(f"written {args.out}/metrics.json, tables and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
