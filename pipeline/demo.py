"""The whole system end to end on built-in demo data, on this machine's CPU: `make demo`.

    python -m pipeline.demo --out runs/demo [--ranks 2] [--pretrain-steps N --finetune-steps N ...]
    python -m pipeline.demo --multi-label [--out runs/demo-multi ...]   # the multi-label demo

Stages, each the same command a user runs (printed before it runs):
 1. demo data: two label sets over generated shape images — `shape-color` (pretraining) and
    `shapes` (the transfer task: a different, coarser label set with few images), with a held-out split;
 2. Ray shards: data_prep writes WebDataset shards for each split;
 3. pretraining: a tiny CoAtNet on 2 CPU ranks under the deepspeed launcher, ZeRO-2, bf16, 32 px;
 4. fine-tuning at twice the resolution (64 px) on the other label set, from the pretrained run
    (new head, resized relative-position tables), and, with the same budget, from scratch;
 5. evaluation of both fine-tuned models on the held-out split, and a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.errors import cli_main
from pipeline.demo_stages import Stages, launcher, prepare_out

REPO = Path(__file__).resolve().parents[1]


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--multi-label" in argv:
        from pipeline import demo_multilabel

        return demo_multilabel.main([a for a in argv if a != "--multi-label"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multi-label", action="store_true",
                        help="run the multi-label demo instead (pipeline/demo_multilabel.py; its options: "
                             "--multi-label --help)")
    parser.add_argument("--out", default="runs/demo", help="output folder (replaced on each run)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (CPU ranks)")
    parser.add_argument("--pretrain-steps", type=int, default=2400)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--pretrain-classes", type=int, default=24, help="shape-colour classes for pretraining")
    parser.add_argument("--pretrain-per-class", type=int, default=200, help="pretraining images per class")
    parser.add_argument("--finetune-label-set", choices=["shapes", "shape-color"], default="shapes",
                        help="label set of the transfer task")
    parser.add_argument("--finetune-classes", type=int, default=6, help="classes of the transfer task")
    parser.add_argument("--finetune-per-class", type=int, default=10,
                        help="fine-tuning images per class: few, as in a transfer to a small labelled set")
    parser.add_argument("--val-per-class", type=int, default=50, help="held-out images per class")
    args = parser.parse_args(argv)

    out = prepare_out(args.out)
    images, shards = out / "images", out / "shards"
    py = sys.executable
    stages = Stages()
    total_start = time.perf_counter()

    # 1. Demo data. Pretraining learns the fine label set (shape x colour); the transfer task is a different,
    # coarser label set (shape alone, including a shape never seen in pretraining) with few labelled images.
    data = [("pretrain", "shape-color", "train", 0, args.pretrain_classes, args.pretrain_per_class),
            ("finetune", args.finetune_label_set, "train", 1, args.finetune_classes, args.finetune_per_class),
            ("finetune", args.finetune_label_set, "val", 2, args.finetune_classes, args.val_per_class)]
    for task, label_set, split, seed, classes, per_class in data:
        stages.run("demo data", [py, "-m", "data_prep", "demo-data", str(images / task / split), "--label-set",
                                 label_set, "--classes", str(classes), "--per-class", str(per_class), "--size", "96",
                                 "--seed", str(seed)])
    # 2. Ray shards (one local Ray per job; --workers 2 uses both cores).
    for task, _, split, *_ in data:
        stages.run("ray shards", [py, "-m", "data_prep", "shard", str(images / task / split), str(shards / task),
                                  "--split", split, "--shard-size", "128", "--max-size", "96", "--seed", "0",
                                  "--workers", "2"])

    # 3. Pretraining at 32 px, ZeRO-2, bf16, on `ranks` CPU processes.
    pretrain_dir = out / "pretrain"
    stages.run("pretrain", launcher(args.ranks) + [
        "pipeline.pretrain", "--config", "configs/demo/pretrain.yaml", f"run_dir={pretrain_dir}",
        f"data.train={shards / 'pretrain'}", f"train.steps={args.pretrain_steps}"])

    # 4. Fine-tuning at twice the resolution on the other label set, and from scratch with the same budget.
    runs = {"fine-tuned from pretraining": out / "finetune", "from scratch": out / "scratch"}
    for name, run_dir in runs.items():
        pretrained = str(pretrain_dir) if "pretraining" in name else "null"
        stages.run(f"finetune ({name})", launcher(args.ranks) + [
            "pipeline.finetune", "--config", "configs/demo/finetune.yaml", f"run_dir={run_dir}",
            f"pretrained={pretrained}", f"data.train={shards / 'finetune'}", f"data.val={shards / 'finetune'}",
            f"train.steps={args.finetune_steps}"])

    # 5. Evaluation on the held-out split.
    results = {}
    for name, run_dir in runs.items():
        report = run_dir / "eval.json"
        stages.run("evaluate", [py, "-m", "pipeline.evaluate", "--weights", str(run_dir), "--data",
                                str(shards / "finetune"), "--split", "val", "--no-center-crop", "--out", str(report)])
        results[name] = json.loads(report.read_text())

    num_classes = len(results["from scratch"]["per_class_top1"])
    total = time.perf_counter() - total_start
    print("\n== summary")
    print(f"held-out images: {results['from scratch']['count']}   classes: {num_classes}   "
          f"chance top-1: {100 / num_classes:.1f}%")
    for name, r in results.items():
        print(f"  {name:28s} top-1 {r['top1']:5.1f}%   top-5 {r['top5']:5.1f}%")
    stages.print_times(total)
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {out} --host 127.0.0.1")
    (out / "summary.json").write_text(json.dumps({"results": results, "stage_seconds": stages.times,
                                                  "total_seconds": total}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
