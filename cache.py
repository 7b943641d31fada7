"""Build (or check) the slice cache described by a config's ``data`` section.

    python cache.py --config configs/quickstart.yaml
    python cache.py --config configs/quickstart.yaml --manifest my_data.csv --out cache/mine
    python cache.py --config configs/quickstart.yaml --check
    python cache.py --config configs/quickstart.yaml --skip-bad --set data.image_size=128
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ddpm.caching import build_cache
from ddpm.config import ConfigError, load_config
from ddpm.nifti_inputs import CacheError, check_subjects, resolve_subjects


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--manifest", help="CSV subject,image,mask[,pathology] (sets "
                        "data.source=manifest and data.manifest)")
    parser.add_argument("--out", help="cache folder (sets data.cache_dir)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the subjects: one row each; exit 1 if any is rejected")
    parser.add_argument("--skip-bad", action="store_true",
                        help="build from the valid subjects and record the rejected ones")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.manifest:
        overrides += ["data.source=manifest", f"data.manifest={args.manifest}"]
    if args.out:
        overrides.append(f"data.cache_dir={args.out}")
    try:
        data_cfg = load_config(args.config, overrides).data
        if args.check:
            subjects = resolve_subjects(data_cfg, log=print)
            checks = check_subjects(subjects, data_cfg, progress=True)
            width = max(len(c.subject.name) for c in checks)
            for c in checks:
                print(f"{c.subject.name:<{width}}  {c.status:<6}  {'; '.join(c.reasons)}".rstrip())
            n_bad = sum(c.status == "reject" for c in checks)
            print(f"{len(checks)} subjects: {len(checks) - n_bad} usable, {n_bad} rejected")
            return 1 if n_bad else 0
        with warnings.catch_warnings():
            # Data warnings are listed in the summary; show each once, without a traceback line.
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            summary = build_cache(data_cfg, skip_bad=args.skip_bad, log=print)
    except (CacheError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
