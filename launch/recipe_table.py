"""Every paper recipe planned on the cluster its header names: the table in docs/planner.md, rendered.

    python -m launch.recipe_table            # print the table (about 1-2 s of planning per recipe)
    python -m launch.recipe_table --write    # and replace it in docs/planner.md, between its markers

Hand-copying 26 plans is how that table once kept ZeRO-1 after the planner moved to ZeRO-2; this renders it from
`launch.plan.plan`, at the planner's defaults (H100 SXM peak, MFU 0.4, --net-gbps 320), each recipe's own node
count (8 GPUs of 80 GB per node), as the config files' headers say they were planned.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "planner.md"
BEGIN, END = "<!-- recipe-table:begin -->", "<!-- recipe-table:end -->"


def _hours(hours: float) -> str:
    from launch.plan_report import _fmt_hours

    return _fmt_hours(hours)


def row(path: Path) -> str:
    """One recipe's line: its plan on the nodes its header's command names."""
    from launch.plan import plan
    from launch.search_space import recompute_value
    from pipeline.config import load_config

    mode = "finetune" if path.parent.name == "finetune" else "pretrain"
    nodes = int(re.search(r"--nodes (\d+)", path.read_text().splitlines()[0]).group(1))
    r = plan(load_config(str(path), [], defaults=mode), nodes, 8, 80)
    c = r["chosen"]
    recompute = recompute_value(c["activation_checkpointing"])
    setting = (f"ZeRO-{c['zero_stage']}, {c['micro_batch_size']} x {c['accumulation']}"
               + (f", recompute {recompute}" if c["activation_checkpointing"] else ""))
    exposed = r.get("exposed_hours") or 0.0
    return (f"| `{path.parent.name}/{path.stem}` | {r['gpus']} | {setting} | {c['total_gib']:.1f} | "
            f"{r['total_steps']:,} | {_hours(r['epoch_hours'])} | {_hours(r['total_hours'])} | "
            f"{_hours(r['total_hours'] + exposed)} |")


def table() -> str:
    lines = ["| recipe | GPUs | plan (ZeRO, micro x accumulation) | GiB per GPU | steps | one epoch | compute "
             "| with communication not hidden |", "|---|---|---|---|---|---|---|---|"]
    for folder in ("pretrain", "finetune"):
        for path in sorted((REPO / "configs" / folder).glob("*.yaml")):
            lines.append(row(path))
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.recipe_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"replace the table in {DOC.relative_to(REPO)}")
    args = p.parse_args(argv)
    text = table()
    if args.write:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
