"""Validate a config and its overrides before a launcher spends an allocation on it.

    python -m launch.config_check --config FILE [--mode pretrain|finetune] [key=value ...]
                                                                  -> prints run_dir on success

The shell launchers call this first, so a typo in a key or a missing config file fails in a second with
pipeline.config's one-line message (`error: ...`, exit 2, via core.errors.cli_main) instead of after every
node has started. It imports only pipeline.config (PyYAML), not torch.
"""
from __future__ import annotations

import argparse
import sys

from core.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.config_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain",
                        help="whose defaults fill what the file leaves out: pipeline.pretrain's or "
                             "pipeline.finetune's (its own run_dir, lr, schedule, ...); default pretrain")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    print(load_config(args.config, args.overrides, defaults=args.mode).run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
