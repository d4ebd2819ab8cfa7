"""Image transforms (torchvision.transforms.v2) shared by training, evaluation and the benchmarks.

Every transform works on uint8 CHW tensors straight from `torchvision.io.decode_image` and ends in
float32 normalised with the ImageNet mean/std (timm's IMAGENET_DEFAULT_MEAN/STD values). v2 transforms
draw from torch's global RNG; pipeline.data seeds it per sample, which is what makes augmentation a pure
function of the sample's position (exact resume).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def train_transform(image_size: int | Sequence[int], randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, normalize: bool = True) -> v2.Compose:
    """Inception-style crop, flip, RandAugment(n, m) (the paper's recipe), then normalise.

    `normalize=False` stops at uint8: the loader then ships 4x smaller batches from its workers and
    normalises whole batches with `normalize_batch` where they are consumed (on the GPU in training).
    """
    ops: list = [v2.RandomResizedCrop(_hw(image_size), scale=scale, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_layers > 0:
        ops.append(v2.RandAugment(num_ops=randaugment_layers, magnitude=randaugment_magnitude))
    if normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, the same values as the per-image ToDtype + Normalize."""
    # in place on the fresh float copy: one allocation per batch instead of two
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), MEAN, STD, inplace=True)


def eval_transform(image_size: int | Sequence[int], center_crop: bool = True, crop_ratio: float = 0.875) -> v2.Compose:
    """Resize + center crop (pretraining evaluation) or resize to the full size (fine-tuning, the paper: no crop)."""
    h, w = _hw(image_size)
    if center_crop:
        resize = (round(h / crop_ratio), round(w / crop_ratio))
        ops: list = [v2.Resize(resize, antialias=True), v2.CenterCrop((h, w))]
    else:
        ops = [v2.Resize((h, w), antialias=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def batch_mix_transform(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """MixUp and/or CutMix on a batch (one of the two picked per batch when both are on); None when both are off.

    Called as `images, targets = mix(images, labels)`; targets become soft (B, num_classes) float.
    """
    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
