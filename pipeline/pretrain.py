"""`python -m pipeline.pretrain --config FILE [key=value ...]`: pretraining under any launcher.

    python -m pipeline.pretrain --config configs/demo/pretrain.yaml                      # one process
    deepspeed --num_gpus 2 --module pipeline.pretrain --config configs/demo/pretrain.yaml  # or --hostfile H
    torchrun --nproc_per_node 2 -m pipeline.pretrain --config configs/demo/pretrain.yaml train.steps=50

User mistakes (bad key or type, missing shards, batch sizes that do not divide) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from core.errors import cli_main
from pipeline.config import format_help, load_config


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def build_parser(prog: str, mode: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file, or key=value overrides; the defaults of this command):\n\n"
               + format_help(mode))
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/demo/); keys not in it keep "
                                                         "the defaults below")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML, e.g. train.steps=100 optim.lr=3e-4 data.image_size=[64,64]")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; the rank also comes through the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@cli_main
def main(argv: Optional[Sequence[str]] = None, mode: str = "pretrain", description: Optional[str] = None) -> int:
    """Every rank raises the same UserError; cli_main prints it on rank 0 only (one line, exit 2)."""
    prog = f"python -m pipeline.{mode}"
    args = build_parser(prog, mode, description or __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.overrides, defaults=mode)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if mode == "finetune" and not cfg.pretrained:
        logging.getLogger("pipeline.train").warning("fine-tuning with pretrained=null: training from scratch")
    from pipeline.runtime import distributed
    from pipeline.train.trainer import run

    try:
        run(cfg, mode=mode)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(mode="pretrain"))
