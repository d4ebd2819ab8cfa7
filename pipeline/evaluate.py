"""Top-1, top-5 and per-class accuracy of trained weights on a shard split, exact across ranks; on a
multi-label split mAP, precision@1, the first label's top-1 and per-class AP instead (pipeline.evaluation.mean_ap).

    python -m pipeline.evaluate --weights runs/demo/finetune --data runs/demo/shards/finetune --split val
    torchrun --nproc_per_node 2 -m pipeline.evaluate --weights exports/demo --data shards/ --image-size 384
    deepspeed --num_gpus 8 --module pipeline.evaluate --weights runs/c3-512 --data /data/in1k-shards

WEIGHTS is anything pipeline.weights.pretrained.load_weights reads (run folder, DeepSpeed checkpoint of any ZeRO stage,
universal checkpoint, export); EMA weights are used when the checkpoint has them (--no-ema: the trained ones).
Each rank reads its own shards, every sample exactly once; the integer counts are summed over ranks, so the
numbers do not depend on the number of ranks or workers. Rank 0 prints the result and writes it as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Iterator, Optional

import torch

from core.errors import UserError, cli_main
from core.files import atomic_write_json
from core.units import PRECISIONS, image_hw, precision_dtype

# What pipeline.runtime.distributed.setup puts into a bare process's environment; restored when main returns.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _image_size(text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(p <= 0 or p % 32 for p in parts):
        raise argparse.ArgumentTypeError(f"{text}: image size must be S or H,W with each side a multiple of 32")
    return list(image_hw(parts[0] if len(parts) == 1 else parts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, metavar="W",
                        help="run folder | DeepSpeed checkpoint folder | universal checkpoint | export folder or "
                             ".safetensors")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="shard folder with _info.json, or a webdataset URL pattern")
    parser.add_argument("--split", default="val", help="split inside the shard folder (default: val)")
    parser.add_argument("--image-size", type=_image_size, default=None, metavar="S",
                        help="evaluation resolution, S or H,W (default: the model's; position tables are resized)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank (default: 2)")
    parser.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=None,
                        help="resize + center crop (pretraining style) or --no-center-crop: resize to the full size "
                             "(the paper's fine-tune evaluation); default: the run's data.center_crop, else crop")
    parser.add_argument("--crop-ratio", type=float, default=None,
                        help="center-crop ratio (default: the run's data.crop_ratio, else 0.875)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use EMA weights when the checkpoint has them (default: yes)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp32, or autocast to bf16/fp16 (default: fp32)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read a DeepSpeed checkpoint your key did not sign (it is a pickle: only if you trust "
                             "its origin)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--out", default=None, metavar="FILE.json",
                        help="where to write the JSON (default: eval_<split>.json in the weights folder)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def _setup_distributed(device_arg: Optional[str]) -> tuple[int, int, torch.device]:
    """(rank, world size, device): pipeline.runtime.distributed's set-up (any launcher), then `--device` if given."""
    from pipeline.runtime.distributed import setup

    info = setup(deterministic=False)
    if not device_arg:
        return info.rank, info.world_size, info.device
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if info.world_size > 1 and device.type != info.device.type:
        raise UserError(f"--device {device_arg}: the {info.world_size} ranks exchange counts on {info.device.type} "
                        f"({info.backend}); drop --device, or evaluate in one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return info.rank, info.world_size, device


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Destroy the process group at the end and leave the launcher variables as they were (in-process calls)."""
    saved = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    try:
        yield
    finally:
        from pipeline.runtime.distributed import teardown

        teardown()
        for key in saved:
            os.environ.pop(key, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _label_map(model_classes, data_classes, where: str) -> Optional[torch.Tensor]:
    """data label index -> model output index when both class lists are known and differ, else None."""
    if model_classes is None or data_classes is None or list(model_classes) == list(data_classes):
        return None
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [c for c in data_classes if c not in index]
    if unknown:
        raise UserError(f"{where}: {len(unknown)} class(es) of the data are not among the model's "
                        f"{len(model_classes)} classes (e.g. {unknown[0]!r}); evaluate on shards of the label set "
                        f"the model was trained on")
    return torch.tensor([index[c] for c in data_classes], dtype=torch.int64)


def _remap(loader, mapping: torch.Tensor):
    for images, labels, *rest in loader:
        # padded label lists (multi-label) keep their -1 padding
        yield (images, torch.where(labels >= 0, mapping[labels.clamp(min=0)], labels), *rest)


def _default_out(weights: str, split: str) -> str:
    path = os.path.expanduser(weights)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f"eval_{split}.json")


def run(args: argparse.Namespace) -> Optional[dict]:
    """Evaluate on every rank; returns the result dict on rank 0 (None elsewhere)."""
    from pipeline.evaluation.loop import build_eval_loader, evaluate
    from pipeline.weights.pretrained import load_model

    from core.storage import check_read_location

    check_read_location(args.data, "--data")  # no `pipe:` command through webdataset, no credentials kept
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --num-workers >= 0 (got {args.batch_size}, "
                        f"{args.num_workers})")
    start = time.perf_counter()
    # The weights first: a wrong --weights fails before any process group (or DeepSpeed import) exists.
    net, meta = load_model(args.weights, ema=args.ema, image_size=args.image_size, trust_pickle=args.trust_checkpoint)
    rank, world, device = _setup_distributed(args.device)
    net.to(device)
    center_crop = args.center_crop if args.center_crop is not None else (
        meta.get("center_crop") if meta.get("center_crop") is not None else True)
    crop_ratio = args.crop_ratio or meta.get("crop_ratio") or 0.875
    image_size = list(net.config.image_size)
    loader, shards = build_eval_loader(args.data, args.split, tuple(image_size), args.batch_size, args.num_workers,
                                       rank, world, center_crop=center_crop, crop_ratio=crop_ratio,
                                       pin_memory=device.type == "cuda")
    mapping = _label_map(meta.get("classes"), shards.classes, args.data)
    batches = _remap(loader, mapping) if mapping is not None else loader
    num_classes = meta["num_classes"]
    if rank == 0:
        print(f"evaluating {meta.get('checkpoint')} ({net.config.name}, {'EMA' if meta.get('ema') else 'trained'} "
              f"weights, step {meta.get('step')}) on {shards.num_samples} images of {args.data} [{args.split}] at "
              f"{image_size[0]}x{image_size[1]} px, {'center crop' if center_crop else 'no crop'}, "
              f"{world} rank(s)", file=sys.stderr, flush=True)
        if meta.get("resized_tables"):
            print(f"resized {len(meta['resized_tables'])} relative-position tables to {image_size[0]}x{image_size[1]} "
                  f"px", file=sys.stderr, flush=True)
    try:
        result = evaluate(net, batches, num_classes, device, dtype=precision_dtype(args.precision), progress=rank == 0,
                          multi_label=shards.multi_label)
    except ValueError as e:  # labels outside the head: wrong data for these weights
        raise UserError(f"{args.data} [{args.split}]: {e}") from None
    seconds = time.perf_counter() - start
    if rank != 0:
        return None
    names = meta.get("classes") or (shards.classes if shards.classes and len(shards.classes) == num_classes
                                    else [str(i) for i in range(num_classes)])
    result.update({
        "weights": args.weights, "checkpoint": meta.get("checkpoint"), "format": meta.get("format"),
        "model": net.config.name, "ema": bool(meta.get("ema")), "step": meta.get("step"), "data": args.data,
        "split": args.split, "image_size": image_size, "center_crop": center_crop, "crop_ratio": crop_ratio,
        "precision": args.precision, "world_size": world, "expected_count": shards.num_samples,
        "classes": names, "seconds": round(seconds, 3),
    })
    if shards.multi_label:
        result["per_class"] = [{"class": n, "ap": a, "positives": p} for n, a, p in
                               zip(names, result["per_class_ap"], result["per_class_positives"])]
    else:
        result["per_class"] = [{"class": n, "top1": a, "count": c, "correct1": k} for n, a, c, k in
                               zip(names, result["per_class_top1"], result["per_class_count"],
                                   result["per_class_correct1"])]
    return result


def _print_multi_label(result: dict) -> None:
    """mAP, precision@1, first-label top-1, then the per-class AP (the 25 worst when there are many)."""
    count = result["count"]
    print(f"mAP {result['mAP']:.2f}% over {result['ap_classes']} classes ({result['ap_skipped_classes']} without a "
          f"positive skipped)   precision@1 {result['precision_at_1']:.2f}% ({result['correct_at_1']}/{count})   "
          f"top-1 of the first label {result['top1_first_label']:.2f}% ({result['correct_first_label']}/{count})")
    _print_per_class(result, "AP", "positives", "ap", lambda r: f"{r['positives']} positives")


def _print(result: dict, out: str) -> None:
    if result.get("multi_label"):
        _print_multi_label(result)
        _warn_short(result)
        print(f"wrote {out}")
        return
    print(f"top-1 {result['top1']:.2f}% ({result['correct1']}/{result['count']})   "
          f"top-5 {result['top5']:.2f}% ({result['correct5']}/{result['count']})")
    _warn_short(result)
    _print_per_class(result, "top-1", "count", "top1", lambda r: f"{r['correct1']}/{r['count']}")
    print(f"wrote {out}")


def _print_per_class(result: dict, metric: str, present: str, key: str, detail) -> None:
    """One line per class with data (the 25 worst by `key` when there are more than 50; all are in the JSON)."""
    rows = [r for r in result["per_class"] if r[present]]
    shown = rows if len(rows) <= 50 else sorted(rows, key=lambda r: r[key])[:25]
    print(f"per-class {metric}" + ("" if len(rows) <= 50 else f" (the 25 worst of {len(rows)}; all in the JSON)")
          + ":")
    width = max((len(str(r["class"])) for r in shown), default=5)
    for r in shown:
        print(f"  {str(r['class']).ljust(width)}  {r[key]:6.2f}%  ({detail(r)})")


def _warn_short(result: dict) -> None:
    if result["count"] != result["expected_count"]:
        print(f"warning: {result['expected_count'] - result['count']} of {result['expected_count']} samples were "
              f"unreadable and skipped (see the warnings above)", file=sys.stderr)


@cli_main
def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    with _process_group():
        result = run(args)
        if result is not None:
            out = args.out or _default_out(args.weights, args.split)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            atomic_write_json(out, result)
            _print(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
