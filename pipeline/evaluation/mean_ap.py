"""Multi-label evaluation, exact across ranks: mean average precision, precision@1, first-label top-1.

    metric = MultiLabelScores(num_classes, device)
    metric.add(logits, labels)          # per batch: float logits (B, C), labels (B, L) padded with -1
    result = metric.result(distributed) # the same dict on every rank

Average precision of class c, as scikit-learn's average_precision_score defines it (no interpolation; tied
scores form one threshold, so the value does not depend on the order of ties):

    AP_c = sum over distinct scores v of positives of c:  (n_v / P_c) * TP_c(>= v) / ALL_c(>= v)

n_v: positives of c scoring exactly v; P_c: positives of c; TP_c(>= v) / ALL_c(>= v): positives / all images
scoring >= v in column c. mAP is the mean over the classes with a positive; classes without one are
skipped and counted (`ap_skipped_classes`).

How it stays exact over ranks: the positives are few (one per label: about 3 per image), the negatives are
not. So every rank all-gathers the (class, score) pairs of its positives (integer sizes, then padded
tensors), and all ranks derive the same distinct thresholds from them. Each rank then counts, per
threshold, its own images scoring >= it in that column (a sort per column and a binary search), and one
integer all_reduce sums the counts. Every figure is a function of the integers and of the gathered scores
only, so 1 and N ranks give bit-identical results when the logits are the same.

Memory, per rank: the rank's scores, 4 x N_r x C bytes on the CPU (N_r images of the rank, C classes; e.g.
12,500 images x 21,841 classes = 1.1 GB); the gathered positives, 12 bytes per label of the whole split on
every rank (1.2 M labels: 14 MB, twice that padded during the gather); and one sorted chunk of
`CHUNK_CLASSES` columns, 8 x 256 x N_r bytes. Nothing of size images x classes is ever sent between ranks
(gathering all scores to rank 0 would hold 4 x N x C bytes there: 35 GB for 400 K images of ImageNet-21K).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_CLASSES = 256  # columns transposed and sorted at once when counting the images above each threshold



def raise_out_of_range(out_of_range: int, num_classes: int) -> None:
    """Labels outside the model's outputs: the data's classes do not match (top-1 and mAP alike refuse them)."""
    if out_of_range:
        raise ValueError(f"{out_of_range} label(s) outside 0..{num_classes - 1}: the data's classes do not match "
                         f"the model's {num_classes} outputs")


class MultiLabelScores:
    """Keeps this rank's scores and labels; `result` computes the exact figures over all ranks."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, torch.device(device)
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.out_of_range = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> int:
        """One batch: logits (B, C), labels (B, L) padded with -1 (first column: the image's first label)."""
        if labels.ndim == 1:
            labels = labels[:, None]
        bad = (labels >= self.num_classes).any(dim=1)
        if bool(bad.any()):  # counted and raised after the collectives, on every rank alike
            self.out_of_range += int(bad.sum())
            logits, labels = logits[~bad], labels[~bad]
        self.scores.append(logits.detach().float().cpu())
        self.labels.append(labels.cpu())
        return labels.shape[0]

    def result(self, distributed: bool) -> dict:

        scores = torch.cat(self.scores) if self.scores else torch.zeros(0, self.num_classes)
        labels = torch.cat([_pad(x, _width(self.labels)) for x in self.labels]) if self.labels else \
            torch.full((0, 1), -1, dtype=torch.int64)
        top = scores.argmax(dim=1) if len(scores) else torch.zeros(0, dtype=torch.int64)
        at_1 = (labels == top[:, None]).any(dim=1)
        first = labels[:, 0] == top
        counts = torch.tensor([int(at_1.sum()), int(first.sum()), len(scores), self.out_of_range],
                              dtype=torch.int64, device=self.device)
        if distributed:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct_at_1, correct_first, count, out_of_range = (int(v) for v in counts.tolist())
        raise_out_of_range(out_of_range, self.num_classes)
        ap, positives = average_precision(scores, labels, self.num_classes, distributed, self.device)
        has = positives > 0
        return {
            "mAP": 100.0 * float(ap[has].mean()) if bool(has.any()) else 0.0,
            "precision_at_1": 100.0 * correct_at_1 / count if count else 0.0,
            "top1_first_label": 100.0 * correct_first / count if count else 0.0,
            "count": count,
            "correct_at_1": correct_at_1,
            "correct_first_label": correct_first,
            "ap_classes": int(has.sum()),
            "ap_skipped_classes": int((~has).sum()),
            "labels": int(positives.sum()),
            "per_class_ap": [100.0 * float(a) if p else None for a, p in zip(ap.tolist(), positives.tolist())],
            "per_class_positives": positives.tolist(),
            "multi_label": True,
        }


def _width(batches: list[torch.Tensor]) -> int:
    return max(x.shape[1] for x in batches)


def _pad(labels: torch.Tensor, width: int) -> torch.Tensor:
    if labels.shape[1] == width:
        return labels
    return torch.cat([labels, labels.new_full((labels.shape[0], width - labels.shape[1]), -1)], dim=1)


def _all_gather(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor (of any length), rank by rank, on every rank."""
    size = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=values.dtype, device=device)
    padded[:values.numel()] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).cpu()


def thresholds(classes: torch.Tensor, scores: torch.Tensor, num_classes: int):
    """The distinct (class, score) pairs of the positives, sorted by class then score descending.

    Returns (class (G,), score (G,), n (G,) positives with exactly that score, tp_ge (G,) positives of that
    class scoring >= it, positives per class (C,)). A pure function of the multiset of pairs: the order the
    ranks gathered them in does not matter.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]
    cls, val = classes[order], scores[order]
    new = torch.ones(len(cls), dtype=torch.bool)
    new[1:] = (cls[1:] != cls[:-1]) | (val[1:] != val[:-1])
    group = torch.cumsum(new.long(), 0) - 1
    n = torch.bincount(group, minlength=int(new.sum())) if len(cls) else torch.zeros(0, dtype=torch.int64)
    positives = torch.bincount(cls, minlength=num_classes)
    before_class = torch.cumsum(positives, 0) - positives  # positives of the classes before each class
    g_cls, g_val = cls[new], val[new]
    tp_ge = torch.cumsum(n, 0) - before_class[g_cls]
    return g_cls, g_val, n, tp_ge, positives


def count_at_or_above(scores: torch.Tensor, g_cls: torch.Tensor, g_val: torch.Tensor) -> torch.Tensor:
    """For each threshold g: how many rows of `scores` (this rank's) have scores[:, g_cls] >= g_val."""
    out = torch.zeros(len(g_cls), dtype=torch.int64)
    if not len(g_cls) or not len(scores):
        return out
    rows = scores.shape[0]
    starts = torch.searchsorted(g_cls, torch.arange(scores.shape[1] + 1))  # g_cls is sorted
    for c0 in range(0, scores.shape[1], CHUNK_CLASSES):
        c1 = min(c0 + CHUNK_CLASSES, scores.shape[1])
        if starts[c0] == starts[c1]:
            continue
        columns = scores[:, c0:c1].T.contiguous().sort(dim=1).values  # ascending, one row per class
        for c in range(c0, c1):
            a, b = int(starts[c]), int(starts[c + 1])
            if a < b:
                out[a:b] = rows - torch.searchsorted(columns[c - c0], g_val[a:b], right=False)
    return out


def average_precision(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, distributed: bool,
                      device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(AP per class, float64 in [0, 1], 0 where a class has no positive; positives per class, int64).

    `scores` (N_r, C) and `labels` (N_r, L, padded with -1) are this rank's; with `distributed` every rank
    calls this and gets the AP over all ranks' images (see the module docstring).
    """
    device = torch.device(device or "cpu")
    rows, cols = torch.nonzero(labels >= 0, as_tuple=True)
    pos_cls = labels[rows, cols]
    pos_val = scores[rows, pos_cls] if len(pos_cls) else torch.zeros(0)
    if distributed:
        pos_cls, pos_val = _all_gather(pos_cls, device), _all_gather(pos_val.float(), device)
    g_cls, g_val, n, tp_ge, positives = thresholds(pos_cls, pos_val, num_classes)
    all_ge = count_at_or_above(scores, g_cls, g_val)
    if distributed:
        all_ge = all_ge.to(device)
        dist.all_reduce(all_ge, op=dist.ReduceOp.SUM)
        all_ge = all_ge.cpu()
    contribution = n.double() * tp_ge.double() / all_ge.double()
    ap = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, g_cls, contribution)
    return ap / positives.clamp(min=1).double(), positives
