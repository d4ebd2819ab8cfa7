"""Classification losses: softmax cross-entropy with label smoothing, or sigmoid BCE (the paper's 21K/JFT choice).

Both take integer labels (B,) or soft targets (B, C) from MixUp/CutMix, and compute in float32 whatever
the model's precision. SigmoidBCE also takes the multi-hot targets of a multi-label split (pipeline.data.loader),
mixed or not; softmax never sees them (the trainer refuses softmax on a multi-label split).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


class _SmoothedLoss(torch.nn.Module):
    """A loss of (logits, integer or soft targets) with label smoothing `label_smoothing`."""

    default_smoothing = 0.0

    def __init__(self, label_smoothing: Optional[float] = None):
        super().__init__()
        self.label_smoothing = self.default_smoothing if label_smoothing is None else label_smoothing


class SoftmaxCrossEntropy(_SmoothedLoss):
    default_smoothing = 0.1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # torch's cross_entropy takes class indices or probabilities, with smoothing for both.
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


class SigmoidBCE(_SmoothedLoss):
    """Independent sigmoid per class, summed over classes and averaged over the batch.

    Default smoothing 1e-4, the paper's 21K/JFT value: the softmax 0.1 would move every negative's target
    to 0.1/C and every positive's to 0.9 + 0.1/C, a loss floor of ~1.3 with 10 classes and 3 labels per image.

    Summing over classes (big_vision's sigmoid_xent) keeps the gradient scale independent of the class
    count (21,841 classes for ImageNet-21K); smoothing moves targets to eps/C and 1 - eps + eps/C (timm's
    BinaryCrossEntropy convention).

    Multi-label smoothing is the same map, t -> t (1 - eps) + eps / C, on each entry of the multi-hot (or
    mixed) target: every positive becomes 1 - eps + eps/C and every negative eps/C, however many labels an
    image has. Why this and not a per-class binary eps/2: an image with one label gets exactly the target
    (and loss) of the single-label path, so a multi-label split whose images carry one label trains like a
    single-label split.
    """

    default_smoothing = 1e-4

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        num_classes = logits.shape[-1]
        if target.ndim == 1:
            target = F.one_hot(target, num_classes).float()
        target = target.float()
        if self.label_smoothing > 0:
            off = self.label_smoothing / num_classes
            target = target * (1.0 - self.label_smoothing) + off
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def initial_head_bias(cfg, shards, num_classes: int) -> Optional[torch.Tensor]:
    """The bias a newly drawn head starts from (float32, (num_classes,)), or None to keep the drawn zeros.

    Why: with a zero bias every sigmoid starts at 0.5, so the first gradients tell every image that each class
    it lacks is present; AdamW moves a bias at most ~lr per step, so the trunk and head weights learn that
    prior instead (measured on composed photographs, 10 classes, 3 per image: after 400 steps the bias was
    -0.02 while the logits' mean was -1.26, carried by a shared direction of saturated tanh pre-logits).
    Starting at the logit of each class's share of the images makes the first loss the prior's entropy and
    leaves the features to the labels. big_vision's JFT/21K heads start at -10 ~ -log(21,843), the same
    prior for one label among C classes, which is the fallback here when data_prep recorded no counts.
    Softmax is unchanged by a shared shift, so it keeps zeros.
    """
    if cfg.loss.head_bias is not None:
        return torch.full((num_classes,), float(cfg.loss.head_bias))
    if cfg.loss.type != "sigmoid":
        return None
    counts = getattr(shards, "class_counts", None)
    if counts and len(counts) == num_classes and shards.num_samples > 0:
        # a class with no image (or every image) is clamped half an image away from 0 and 1
        share = (torch.tensor(counts, dtype=torch.float64) / shards.num_samples).clamp(
            0.5 / shards.num_samples, 1 - 0.5 / shards.num_samples)
        return torch.logit(share).float()
    return torch.full((num_classes,), -math.log(max(num_classes - 1, 1)))


def build_loss(cfg) -> torch.nn.Module:
    if cfg.loss.type == "sigmoid":
        return SigmoidBCE(cfg.loss.label_smoothing)
    return SoftmaxCrossEntropy(cfg.loss.label_smoothing)
