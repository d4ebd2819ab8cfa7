"""Exact evaluation over WebDataset shards: every sample counted once, whatever the ranks and workers.

Why not reuse the training loader: training streams are infinite and padded to equal length per rank so
collectives never hang; evaluation must instead see each sample exactly once. Shards are dealt to ranks
round robin (`urls[rank::world_size]`) and then to the rank's DataLoader workers the same way, so no
sample is read twice and none is padded in. A rank or worker may get no shard at all (fewer shards than
ranks x workers): it yields nothing, and `evaluate` keeps it stepping in lockstep with the others so
ZeRO-3's per-forward parameter gathers still match up. Counts are integers summed with all_reduce, so the
accuracy is exact, not an average of per-rank averages.

    loader, shards = build_eval_loader("shards/", "val", 64, batch_size=64, num_workers=2, rank=0, world_size=1)
    result = evaluate(model, loader, num_classes=len(shards.classes), device=torch.device("cpu"))
    result["top1"], result["count"], result["per_class_top1"]
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.shards import ShardSet, decode_sample, open_shards, worker_init
from pipeline.transforms import eval_transform


class _DecodeEval:
    """sample dict -> (normalised float image, label[, key]); a picklable callable for DataLoader workers."""

    def __init__(self, transform, return_keys: bool):
        self.transform = transform
        self.return_keys = return_keys

    def __call__(self, sample: dict):
        image, label = decode_sample(sample)
        image = self.transform(image)
        return (image, label, sample["__key__"]) if self.return_keys else (image, label)


class _NoSamples(IterableDataset):
    def __iter__(self):
        return iter(())


def shards_for_rank(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank `rank` evaluates: round robin, so ranks differ by at most one shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return list(urls[rank::world_size])


def build_eval_loader(path: str, split: str, image_size, batch_size: int, num_workers: int, rank: int,
                      world_size: int, center_crop: bool = True, crop_ratio: float = 0.875,
                      return_keys: bool = False, pin_memory: bool = False) -> tuple[DataLoader, ShardSet]:
    """A sequential (unshuffled) loader over this rank's share of `split`, and the whole split's ShardSet.

    Yields (images float32 NCHW normalised, labels int64), plus the sample keys when `return_keys`.
    Over all ranks every sample is yielded exactly once. A corrupt sample or shard is skipped with a
    warning (webdataset's warn_and_continue); `evaluate`'s count then falls short of `shards.num_samples`,
    which the CLI reports.
    """
    shards = open_shards(path, split)
    urls = shards_for_rank(shards.urls, rank, world_size)
    # More workers than shards would only start idle processes; zero shards => load in-process (nothing).
    workers = min(max(0, num_workers), len(urls))
    decode = _DecodeEval(eval_transform(image_size, center_crop, crop_ratio), return_keys)
    if urls:
        dataset = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,  # worker w of this rank reads urls[w::workers]
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.map(decode, handler=wds.warn_and_continue),
        )
    else:
        dataset = _NoSamples()  # more ranks than shards: this rank only keeps the others company
    kwargs = dict(num_workers=workers, worker_init_fn=worker_init, prefetch_factor=2) if workers else {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, pin_memory=pin_memory,
                        **kwargs)
    return loader, shards


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dummy_input(model: torch.nn.Module, last_shape: Optional[torch.Size]) -> torch.Tensor:
    """A one-image batch for a rank that has run out of data but must still join ZeRO-3's gathers."""
    if last_shape is not None:
        return torch.zeros((1, *last_shape[1:]))
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    height, width = inner.config.image_size
    return torch.zeros(1, 3, height, width)


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """bf16/fp16 when the module itself is held in half precision (DeepSpeed casts it), else fp32."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return torch.float32


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, num_classes: int, device: torch.device,
             dtype: Optional[torch.dtype] = None, progress: bool = False,
             distributed: Optional[bool] = None) -> dict:
    """Top-1/top-5 accuracy (percent) with exact integer counts summed over all ranks.

    `dtype` (torch.bfloat16 / torch.float16) evaluates under autocast; None or float32 runs in full
    precision. Returns {"top1", "top5", "count", "correct1", "correct5", "per_class_top1" (percent, None for
    a class without samples), "per_class_count", "per_class_correct1"}. Every rank gets the same result.
    When torch.distributed is initialised, all ranks must call this (it holds collectives), unless
    `distributed=False` (this rank's loader only, no collectives); None means "if initialised".
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    distributed = _distributed() if distributed is None else distributed
    input_dtype = _input_dtype(model)
    autocast = dtype is not None and dtype != torch.float32
    totals = torch.zeros(4, dtype=torch.int64, device=device)  # correct1, correct5, count, labels out of range
    class_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    batches = iter(loader)
    last_shape = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="evaluate", unit="img", dynamic_ncols=True)
    try:
        while True:
            batch = next(batches, None)
            if distributed:
                # Lockstep: every rank runs a forward until all ranks are out of data, because ZeRO-3 gathers
                # parameters collectively inside each forward. One tiny all_reduce per batch.
                more = torch.tensor([0 if batch is None else 1], device=device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if more.item() == 0:
                    break
            elif batch is None:
                break
            if batch is None:
                images, labels = _dummy_input(model, last_shape), None
            else:
                images, labels = batch[0], batch[1]
                last_shape = images.shape
            images = images.to(device, dtype=input_dtype, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
                logits = model(images)
            if labels is None:
                continue
            labels = labels.to(device, non_blocking=True)
            valid = (labels >= 0) & (labels < num_classes)
            if not bool(valid.all()):
                # Counted and raised after the loop on every rank alike: raising here would hang the others.
                totals[3] += int((~valid).sum())
                logits, labels = logits[valid], labels[valid]
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit1 = top[:, 0] == labels
            hit5 = (top == labels[:, None]).any(dim=-1)
            totals[:3] += torch.stack([hit1.sum(), hit5.sum(), torch.tensor(labels.numel(), device=device)])
            class_count += torch.bincount(labels, minlength=num_classes)
            class_correct += torch.bincount(labels[hit1], minlength=num_classes)
            if bar is not None:
                bar.update(labels.numel())
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if distributed:
        packed = torch.cat([totals, class_count, class_correct])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        totals, class_count, class_correct = packed[:4], packed[4:4 + num_classes], packed[4 + num_classes:]
    correct1, correct5, count, out_of_range = (int(v) for v in totals.tolist())
    if out_of_range:
        raise ValueError(f"{out_of_range} label(s) outside 0..{num_classes - 1}: the data's classes do not match "
                         f"the model's {num_classes} outputs")
    class_count_l, class_correct_l = class_count.tolist(), class_correct.tolist()
    return {
        "top1": 100.0 * correct1 / count if count else 0.0,
        "top5": 100.0 * correct5 / count if count else 0.0,
        "count": count,
        "correct1": correct1,
        "correct5": correct5,
        "per_class_top1": [100.0 * c / n if n else None for c, n in zip(class_correct_l, class_count_l)],
        "per_class_count": class_count_l,
        "per_class_correct1": class_correct_l,
    }
