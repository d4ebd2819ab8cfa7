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

A multi-label split (`shards.multi_label`) yields each image's label list, padded with -1, and
`evaluate(..., multi_label=True)` gives mAP, precision@1 and the first label's top-1 (pipeline.evaluation.mean_ap,
which also states its memory).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.shards import ShardSet, decode_sample, open_shards, pad_labels, tarfile_samples, worker_init
from pipeline.data.transforms import eval_transform
from pipeline.evaluation.mean_ap import MultiLabelScores, raise_out_of_range


class _DecodeEval:
    """sample dict -> (normalised float image, label or label list[, key]); picklable for DataLoader workers."""

    def __init__(self, transform, return_keys: bool, multi_label: bool = False):
        self.transform = transform
        self.return_keys = return_keys
        self.multi_label = multi_label

    def __call__(self, sample: dict):
        image, label = decode_sample(sample, self.multi_label)
        image = self.transform(image)
        return (image, label, sample["__key__"]) if self.return_keys else (image, label)


def collate_multi_label(samples: list) -> tuple:
    """(image, labels[, key]) samples -> (images, labels padded with -1 (B, L)[, keys])."""
    columns = list(zip(*samples))
    out = [torch.stack(columns[0]), pad_labels(list(columns[1]))]
    return tuple(out + [list(c) for c in columns[2:]])


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
                      return_keys: bool = False, pin_memory: bool = False,
                      multi_label: Optional[bool] = None, in_training: bool = False) -> tuple[DataLoader, ShardSet]:
    """A sequential (unshuffled) loader over this rank's share of `split`, and the whole split's ShardSet.

    Yields (images float32 NCHW normalised, labels int64), plus the sample keys when `return_keys`.
    `multi_label` (default: the split's `shards.multi_label`): labels are (B, L) label lists padded with -1.
    `in_training`: the loader of evaluations inside a training run. Its workers come from a forkserver and stay
    alive between evaluations: forking the trainer itself (watchdog, TensorBoard, DataLoader feeder threads,
    and on GPUs NCCL's) deadlocked a child in CPython's after-fork thread clean-up (seen twice on 2 CPU ranks).
    Over all ranks every sample is yielded exactly once. A corrupt sample or shard is skipped with a
    warning (webdataset's warn_and_continue); `evaluate`'s count then falls short of `shards.num_samples`,
    which the CLI reports.
    """
    shards = open_shards(path, split)
    urls = shards_for_rank(shards.urls, rank, world_size)
    # More workers than shards would only start idle processes; zero shards => load in-process (nothing).
    workers = min(max(0, num_workers), len(urls))
    multi_label = shards.multi_label if multi_label is None else multi_label
    decode = _DecodeEval(eval_transform(image_size, center_crop, crop_ratio), return_keys, multi_label)
    if urls:
        dataset = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,  # worker w of this rank reads urls[w::workers]
            tarfile_samples,  # wds.tarfile_to_samples, but plain tars only and no member over the byte limit
            wds.map(decode, handler=wds.warn_and_continue),
        )
    else:
        dataset = _NoSamples()  # more ranks than shards: this rank only keeps the others company
    kwargs = dict(num_workers=workers, worker_init_fn=worker_init, prefetch_factor=2) if workers else {}
    if workers and in_training:
        kwargs.update(multiprocessing_context="forkserver", persistent_workers=True)
    if multi_label:
        kwargs["collate_fn"] = collate_multi_label
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, pin_memory=pin_memory,
                        **kwargs)
    return loader, shards


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dummy_input(model: torch.nn.Module, full_shape: Optional[torch.Size]) -> torch.Tensor:
    """A batch for a rank that has run out of data but must still join ZeRO-3's gathers: zeros of the full
    batch's shape, so a compiled model sees a shape it has already compiled for (a one-image filler was a
    recompile of flex attention per stage); one image when this rank had no data at all."""
    if full_shape is not None:
        return torch.zeros(full_shape)
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    height, width = inner.config.image_size
    return torch.zeros(1, 3, height, width)


def pad_batch(images: torch.Tensor, full_shape: Optional[torch.Size]) -> torch.Tensor:
    """The partial last batch padded with zero images to the full batch size (their logits are dropped), so
    every forward of an evaluation has one shape: no recompile of a compiled model for the last batch.
    Evaluation-mode layers treat images independently, so the padding changes no real image's logits."""
    if full_shape is None or images.shape[0] >= full_shape[0] or images.shape[1:] != full_shape[1:]:
        return images
    return torch.cat([images, images.new_zeros((full_shape[0] - images.shape[0], *images.shape[1:]))])


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """bf16/fp16 when the module itself is held in half precision (DeepSpeed casts it), else fp32."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return torch.float32


class _SingleLabel:
    """Top-1/top-5 and per-class top-1 as integer counts, summed over ranks at the end."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        self.totals = torch.zeros(4, dtype=torch.int64, device=device)  # correct1, correct5, count, out of range
        self.class_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> int:
        valid = (labels >= 0) & (labels < self.num_classes)
        if not bool(valid.all()):
            # Counted and raised after the loop on every rank alike: raising here would hang the others.
            self.totals[3] += int((~valid).sum())
            logits, labels = logits[valid], labels[valid]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(dim=-1)
        self.totals[:3] += torch.stack([hit1.sum(), hit5.sum(), torch.tensor(labels.numel(), device=self.device)])
        self.class_count += torch.bincount(labels, minlength=self.num_classes)
        self.class_correct += torch.bincount(labels[hit1], minlength=self.num_classes)
        return labels.numel()

    def result(self, distributed: bool) -> dict:
        n = self.num_classes
        totals, class_count, class_correct = self.totals, self.class_count, self.class_correct
        if distributed:
            packed = torch.cat([totals, class_count, class_correct])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            totals, class_count, class_correct = packed[:4], packed[4:4 + n], packed[4 + n:]
        correct1, correct5, count, out_of_range = (int(v) for v in totals.tolist())
        raise_out_of_range(out_of_range, n)
        class_count_l, class_correct_l = class_count.tolist(), class_correct.tolist()
        return {
            "top1": 100.0 * correct1 / count if count else 0.0,
            "top5": 100.0 * correct5 / count if count else 0.0,
            "count": count,
            "correct1": correct1,
            "correct5": correct5,
            "per_class_top1": [100.0 * c / k if k else None for c, k in zip(class_correct_l, class_count_l)],
            "per_class_count": class_count_l,
            "per_class_correct1": class_correct_l,
        }


# What the trainer logs of a result (eval/<key>), and the headline figures of its console line.
LOGGED_KEYS = ("top1", "top5", "count", "per_class_top1", "mAP", "precision_at_1", "top1_first_label")
_HEADLINE = (("top1", "top1"), ("top5", "top5"), ("mAP", "mAP"), ("precision_at_1", "P@1"),
             ("top1_first_label", "top1(first label)"))


def headline(result: dict) -> str:
    """`top1 71.20 top5 90.10` or `mAP 55.30 P@1 80.00 top1(first label) 61.00`: whichever figures it has."""
    return " ".join(f"{name} {result[key]:.2f}" for key, name in _HEADLINE if result.get(key) is not None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, num_classes: int, device: torch.device,
             dtype: Optional[torch.dtype] = None, progress: bool = False,
             distributed: Optional[bool] = None, multi_label: bool = False) -> dict:
    """Top-1/top-5 accuracy (percent) with exact integer counts summed over all ranks; or, with `multi_label`
    (the loader yields padded label lists, build_eval_loader on a multi-label split), pipeline.evaluation.mean_ap's
    mAP, precision@1 and first-label top-1, exact over ranks too.

    `dtype` (torch.bfloat16 / torch.float16) evaluates under autocast; None or float32 runs in full
    precision. Single-label returns {"top1", "top5", "count", "correct1", "correct5", "per_class_top1"
    (percent, None for a class without samples), "per_class_count", "per_class_correct1"}; multi-label returns
    pipeline.evaluation.mean_ap.MultiLabelScores.result's keys. Every rank gets the same result.
    When torch.distributed is initialised, all ranks must call this (it holds collectives), unless
    `distributed=False` (this rank's loader only, no collectives); None means "if initialised".
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    distributed = _distributed() if distributed is None else distributed
    input_dtype = _input_dtype(model)
    autocast = dtype is not None and dtype != torch.float32
    metric = MultiLabelScores(num_classes, device) if multi_label else _SingleLabel(num_classes, device)
    batches = iter(loader)
    full_shape = None
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
                images, labels = _dummy_input(model, full_shape), None
            else:
                images, labels = batch[0], batch[1]
                full_shape = full_shape or images.shape
            count = images.shape[0]
            images = pad_batch(images, full_shape).to(device, dtype=input_dtype, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
                logits = model(images)[:count]
            if labels is None:
                continue
            counted = metric.add(logits.float(), labels.to(device, non_blocking=True))
            if bar is not None:
                bar.update(counted)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return metric.result(distributed)
