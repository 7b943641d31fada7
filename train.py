"""Train a diffusion model: ``python train.py --config configs/quickstart.yaml``.

Builds the slice cache first when it is absent (generating the phantom data for
``data.source: phantom``), then trains into ``runs/<train.name>/``. Under
``torchrun --nproc_per_node N train.py ...`` it trains with DistributedDataParallel.
"""

import argparse
import sys

from ddpm.config import ConfigError, load_config
from ddpm.trainer import TrainingDiverged, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", default=None,
                        help="'auto' to continue the run's last checkpoint, or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, config_path=args.config, resume=args.resume,
                       progress=not args.no_progress)
    except (ConfigError, FileExistsError, TrainingDiverged, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.history:
        last = result.history[-1]
        print(f"finished ({result.stopped}) at step {result.step}, epoch {result.epoch}; "
              f"run folder {result.run_dir}")
        psnrs = [f"{k}={v:.2f}" for k, v in last.items() if k.startswith("psnr")]
        print("last validation: " + ", ".join(psnrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
