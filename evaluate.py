"""Evaluate a lesion-synthesis checkpoint, or diagnose one that samples badly.

    python evaluate.py --checkpoint runs/quickstart/checkpoints/last.pt --out eval/
    python evaluate.py --checkpoint last.pt --split test -n 8 --steps 100 --out eval_test/
    python evaluate.py --checkpoint last.pt --diagnose --out eval/

The cache is the one named in the checkpoint's config (or --cache-dir), and is refused when
its settings differ from those the model was trained on. Evaluation writes into ``--out``:
metrics.json (sections reconstruction, generation, condition_faithfulness, distribution),
reconstruction.csv, generation_by_condition.csv, samples.npz and PNG plots. ``--diagnose``
instead prints a PASS/WARN/FAIL checklist, writes diagnose.json, and exits with status 1
when a check FAILs. The condition classifier is trained once and cached as classifier.pt
beside the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.caching import StaleCacheError
from ddpm.config import ConfigError, load_config
from ddpm.diagnose import FAIL, diagnose, report_dict, report_text, worst
from ddpm.evaluation import EvalSettings, evaluate, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", choices=("val", "test"), default="val", help="real slices to "
                   "compare with (default val)")
    p.add_argument("--cache-dir", help="the cache, when it moved (default: the checkpoint's "
                   "data.cache_dir); its settings must match the checkpoint's")
    p.add_argument("-n", "--n-per-condition", type=int, default=4,
                   help="minimum samples per condition of the split (default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: checkpoint's)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: checkpoint's")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (default: checkpoint's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="generate with the EMA weights (default) or --no-ema the live ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per sampler batch")
    p.add_argument("--max-real", type=int, help="use at most this many real slices")
    p.add_argument("--timesteps", help="reconstruction timesteps, e.g. 50,250,500 (default "
                   "10,50,100,250,500,750,900 and the config's eval.timesteps)")
    p.add_argument("--recon-slices", type=int, default=32,
                   help="real slices of the reconstruction batch, half with lesions (default 32)")
    p.add_argument("--diagnose", action="store_true", help="run the checklist instead")
    p.add_argument("--diagnose-samples", type=int, default=16,
                   help="samples generated for the sample-statistics check (default 16)")
    p.add_argument("--config", help="with --diagnose: a config file to compare the "
                   "checkpoint's schedule with")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    timesteps = [int(t) for t in args.timesteps.split(",")] if args.timesteps else None
    try:
        if args.diagnose:
            current = load_config(args.config) if args.config else None
            checks = diagnose(args.checkpoint, split=args.split, cache_dir=args.cache_dir,
                              n_samples=args.diagnose_samples, steps=args.steps, seed=args.seed,
                              recon_slices=args.recon_slices, timesteps=timesteps,
                              current_config=current, device=args.device,
                              progress=not args.no_progress)
            print(report_text(checks, f"diagnosis of {args.checkpoint}"))
            write_json(out / "diagnose.json", report_dict(checks, checkpoint=args.checkpoint))
            print(f"written {out / 'diagnose.json'}")
            return 1 if worst(checks) == FAIL else 0
        settings = EvalSettings(split=args.split, n_per_condition=args.n_per_condition,
                                weights="ema" if args.ema else "live", steps=args.steps,
                                sampler=args.sampler, eta=args.eta, seed=args.seed,
                                batch_size=args.batch_size, max_real=args.max_real,
                                recon_slices=args.recon_slices, timesteps=timesteps)
        metrics = evaluate(args.checkpoint, out, settings, cache_dir=args.cache_dir,
                           device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, StaleCacheError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(metrics))
    print(f"written {out / 'metrics.json'} and plots")
    return 0


def summary(m: dict) -> str:
    """A few lines of the headline numbers."""
    r, g = m["reconstruction"], m["generation"]
    f, d = m["condition_faithfulness"], m["distribution"]
    t = r["timesteps"]
    lines = ["x0-PSNR (dB) by t:   " + "  ".join(f"{x:>6}" for x in t)]
    for w in ("live", "ema"):
        values = "  ".join(f"{r[w][f'psnr_t{x}']:6.2f}" for x in t)
        lines.append(f"  {w:<4}               {values}")

    def num(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines += [
        f"generation: {g['n_generated']} samples vs {g['n_real']} real slices; best-match PSNR "
        f"{num(g['best_psnr'], '.2f')} dB, SSIM {num(g['best_ssim'])}; diversity (1-SSIM) "
        f"generated {num(g['diversity_generated'])} vs real {num(g['diversity_real'])}",
        "classifier accuracy    z exact  z +-1  lesion",
    ]
    for name in ("real", "generated"):
        a = f[name]
        lines.append(f"  {name:<20} {a['z_exact']:7.3f} {a['z_within1']:6.3f} {a['lesion']:7.3f}")
    kg, kb = d["kid_generated_vs_real"], d["kid_train_vs_real"]
    lines.append(f"KID generated vs real {kg['mean']:.4f} +- {kg['std']:.4f}; baseline train vs "
                 f"real {kb['mean']:.4f} +- {kb['std']:.4f}")
    la, lc = d["lesion_area_px"], d["lesion_contrast"]
    lines.append(f"lesion area (px) real {num(la['real']['mean'], '.1f')} vs generated "
                 f"{num(la['generated']['mean'], '.1f')}; contrast real "
                 f"{num(lc['real']['mean'])} vs generated {num(lc['generated']['mean'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
