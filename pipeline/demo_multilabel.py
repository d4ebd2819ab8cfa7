"""The multi-label demo (issue 11) end to end on this machine's CPU: `python -m pipeline.demo --multi-label`.

    python -m pipeline.demo --multi-label --out runs/demo-multi [--ranks 2] [--pretrain-steps N ...]

Stages, each the same command a user runs (printed before it runs):
 1. demo data: `multi` images (2-3 shapes each, labels = the shapes present) for pretraining and a held-out
    multi-label split; `cells` images (one shape each, drawn as in `multi`, single-label, one shape class
    never seen in pretraining) for the transfer task, few per class, with a held-out split. The transfer set
    is drawn at the pretraining scale: with `shapes` (one large shape per image) fine-tuning from the
    multi-label pretraining beat scratch by only 1.7 points (32.8% vs 31.1%), a different task;
 2. Ray shards: data_prep writes a multi-label split (`.labels` members) and single-label splits;
 3. pretraining: sigmoid BCE on multi-hot targets, 2 CPU ranks under the deepspeed launcher, ZeRO-2, bf16;
 4. mAP on the held-out multi-label images: the pretrained model against the untrained model it started
    from (the same seed and initialisation, written as an export);
 5. fine-tuning onto the single-label split (head rows copied by class name: the shapes pretraining saw),
    and, with the same budget, from scratch; top-1 of both on the held-out single-label images.
`--finetune-steps 0` stops after stage 4.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.errors import cli_main
from pipeline.demo_stages import Stages, launcher, prepare_out

PRETRAIN_SIZE = 64  # px: the shapes of a multi image fill a quarter of it at most


def pretrain_overrides(run_dir: Path, shards: Path, steps: int) -> list[str]:
    """The demo's multi-label pretraining: configs/demo/pretrain.yaml switched to sigmoid on multi-hot targets."""
    return [f"run_dir={run_dir}", f"data.train={shards}", f"data.val={shards}", "loss.type=sigmoid", "precision=bf16",
            "loss.label_smoothing=0.0001", "model.name=coatnet-nano", f"data.image_size={PRETRAIN_SIZE}",
            "data.min_crop_scale=1.0",  # any crop may cut a shape out and leave its label wrong
            "data.center_crop=false", "optim.lr=2e-3", "optim.warmup_steps=10", f"train.steps={steps}",
            f"train.eval_every={max(1, steps // 4)}", f"checkpoint.every_steps={steps}"]


def write_untrained(out: Path, run_dir: Path) -> None:
    """The pretraining run's starting point, as an export: its model config, initialised as the trainer does."""
    import torch
    from safetensors.torch import save_file

    from core.units import precision_dtype
    from model import build_initialised
    from pipeline.config import load_config
    from pipeline.data.shards import open_shards
    from pipeline.train.loss import initial_head_bias
    from pipeline.train.model_args import run_model_kwargs

    cfg = load_config(str(run_dir / "config.yaml"))
    classes = json.loads((run_dir / "classes.json").read_text())["classes"]
    kwargs = run_model_kwargs(cfg, len(classes))
    # The dtype the run trained in: its initial weights are these draws rounded to it (pipeline.train.build).
    net = build_initialised(**kwargs, seed=cfg.seed, device=torch.device("cpu"), dtype=precision_dtype(cfg.precision))
    bias = initial_head_bias(cfg, open_shards(cfg.data.train, cfg.data.train_split), len(classes))
    if bias is not None:
        with torch.no_grad():
            net.head.bias.copy_(bias)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: (v.float() if v.is_floating_point() else v).detach().contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": dict(kwargs, grad_checkpointing=False),
                                                 "classes": classes, "center_crop": False, "step": 0}))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo --multi-label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo-multi", help="output folder (replaced on each run)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (CPU ranks)")
    parser.add_argument("--classes", type=int, default=5, help="shape classes of the multi-label set (<= 8)")
    parser.add_argument("--per-class", type=int, default=400, help="multi-label images = classes x per-class")
    parser.add_argument("--val-per-class", type=int, default=40, help="held-out images = classes x this")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-classes", type=int, default=6,
                        help="single-label shape classes of the transfer task (one more than pretraining: a new one)")
    parser.add_argument("--finetune-per-class", type=int, default=20, help="fine-tuning images per class")
    parser.add_argument("--finetune-steps", type=int, default=100, help="0: stop after the mAP comparison")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out = prepare_out(args.out)
    images, shards = out / "images", out / "shards"
    py = sys.executable
    stages = Stages()
    total_start = time.perf_counter()

    # 1-2. Demo data and shards. The multi-label classes file fixes the class order of both multi splits.
    multi = [("train", 0, args.per_class), ("val", 1, args.val_per_class)]
    for split, seed, per_class in multi:
        stages.run("demo data", [py, "-m", "data_prep", "demo-data", str(images / "multi" / split), "--label-set",
                                 "multi", "--classes", str(args.classes), "--per-class", str(per_class), "--size",
                                 str(PRETRAIN_SIZE), "--seed", str(seed)])
    classes_txt = images / "multi" / "train" / "classes.txt"
    for split, *_ in multi:
        stages.run("ray shards", [py, "-m", "data_prep", "shard", str(images / "multi" / split / "labels.jsonl"),
                                  str(shards / "multi"), "--split", split, "--classes", str(classes_txt),
                                  "--shard-size", "128", "--seed", "0", "--workers", "2"])

    # 3. Sigmoid pretraining on the multi-hot targets.
    pretrain_dir = out / "pretrain"
    stages.run("pretrain", launcher(args.ranks) + [
        "pipeline.pretrain", "--config", "configs/demo/pretrain.yaml",
        *pretrain_overrides(pretrain_dir, shards / "multi", args.pretrain_steps)])

    # 4. mAP on held-out images: pretrained vs the untrained model it started from.
    untrained = out / "untrained"
    write_untrained(untrained, pretrain_dir)
    multi_results = {}
    for name, weights in (("pretrained", pretrain_dir), ("untrained", untrained)):
        report = out / f"eval_multi_{name}.json"
        stages.run("evaluate", [py, "-m", "pipeline.evaluate", "--weights", str(weights), "--data",
                                str(shards / "multi"), "--split", "val", "--no-center-crop", "--out", str(report)])
        multi_results[name] = json.loads(report.read_text())

    # 5. Fine-tuning onto the single-label shapes, from the pretraining and from scratch.
    single_results = {}
    if args.finetune_steps > 0:
        single_results = _transfer(args, out, images, shards, pretrain_dir, stages)
    _summary(out, multi_results, single_results, stages, time.perf_counter() - total_start)


def _transfer(args, out: Path, images: Path, shards: Path, pretrain_dir: Path, stages: Stages) -> dict:
    py = sys.executable
    for split, seed, per_class in (("train", 2, args.finetune_per_class), ("val", 3, 30)):
        stages.run("demo data", [py, "-m", "data_prep", "demo-data", str(images / "cells" / split), "--label-set",
                                 "cells", "--classes", str(args.finetune_classes), "--per-class", str(per_class),
                                 "--size", str(PRETRAIN_SIZE), "--seed", str(seed)])
        stages.run("ray shards", [py, "-m", "data_prep", "shard", str(images / "cells" / split),
                                  str(shards / "cells"), "--split", split, "--shard-size", "128", "--max-size",
                                  str(PRETRAIN_SIZE), "--seed", "0", "--workers", "2"])
    results = {}
    for name, pretrained in (("fine-tuned from pretraining", str(pretrain_dir)), ("from scratch", "null")):
        run_dir = out / ("finetune" if pretrained != "null" else "scratch")
        stages.run(f"finetune ({name})", launcher(args.ranks) + [
            "pipeline.finetune", "--config", "configs/demo/finetune.yaml", f"run_dir={run_dir}",
            f"pretrained={pretrained}", "model.name=coatnet-nano", f"data.train={shards / 'cells'}",
            f"data.val={shards / 'cells'}", f"data.image_size={PRETRAIN_SIZE}", "data.min_crop_scale=1.0",
            f"train.steps={args.finetune_steps}", f"checkpoint.every_steps={args.finetune_steps}"])
        report = run_dir / "eval.json"
        stages.run("evaluate", [py, "-m", "pipeline.evaluate", "--weights", str(run_dir), "--data",
                                str(shards / "cells"), "--split", "val", "--no-center-crop", "--out", str(report)])
        results[name] = json.loads(report.read_text())
    return results


def _summary(out: Path, multi: dict, single: dict, stages: Stages, total: float) -> None:
    print("\n== summary")
    held_out = multi["pretrained"]
    print(f"multi-label held-out images: {held_out['count']}, {held_out['labels']} labels over "
          f"{held_out['ap_classes']} classes")
    for name, r in multi.items():
        print(f"  {name:28s} mAP {r['mAP']:5.1f}%   precision@1 {r['precision_at_1']:5.1f}%   "
              f"top-1 (first label) {r['top1_first_label']:5.1f}%")
    if single:
        n = len(next(iter(single.values()))["per_class_top1"])
        print(f"single-label transfer: {next(iter(single.values()))['count']} held-out images, {n} classes, "
              f"chance top-1 {100 / n:.1f}%")
        for name, r in single.items():
            print(f"  {name:28s} top-1 {r['top1']:5.1f}%   top-5 {r['top5']:5.1f}%")
    stages.print_times(total)
    (out / "summary.json").write_text(json.dumps({"multi_label": multi, "transfer": single,
                                                  "stage_seconds": stages.times, "total_seconds": total}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
