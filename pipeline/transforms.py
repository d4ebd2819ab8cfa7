"""Image transforms (torchvision.transforms.v2) shared by training, evaluation and the benchmarks.

Every transform works on uint8 CHW tensors straight from `torchvision.io.decode_image` and ends in
float32 normalised with the ImageNet mean/std (timm's IMAGENET_DEFAULT_MEAN/STD values). v2 transforms
draw from torch's global RNG; pipeline.data seeds it per sample, which is what makes augmentation a pure
function of the sample's position (exact resume).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from core.units import ImageSize, image_hw

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TensorToPIL(torch.nn.Module):
    """uint8 CHW tensor -> PIL RGB image (for the ops that are cheaper on PIL images)."""

    def forward(self, image: torch.Tensor) -> Image.Image:
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


class PILToCHW(torch.nn.Module):
    """PIL RGB image -> contiguous CHW tensor: uint8, or float32 normalised with MEAN/STD.

    Hand-written instead of v2.PILToTensor + ToDtype + Normalize, which make three float passes through a
    strided CHW view (0.70 ms per 224 px image here). Transposing the uint8 array first (4x fewer bytes)
    and normalising with one promoting multiply and one add costs 0.30 ms, for the same values up to
    float rounding (2e-7).
    """

    _SCALE = (1 / (torch.tensor(STD) * 255)).view(3, 1, 1)
    _SHIFT = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def forward(self, image: Image.Image) -> torch.Tensor:
        chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return torch.mul(chw, self._SCALE).add_(self._SHIFT) if self.normalize else chw


def train_transform(image_size: ImageSize, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, normalize: bool = True) -> v2.Compose:
    """Inception-style crop, flip, RandAugment(n, m) (the paper's recipe), then normalise.

    Input: a uint8 CHW tensor from torchvision's decoder. Crop and flip run on the tensor (1.8x faster
    than on PIL here); RandAugment runs on a PIL image, where its ops are 3x faster than on tensors
    (0.35 vs 1.02 ms per 224 px image, measured with torchvision 0.29). Together 15% less CPU per image
    than either all-tensor or all-PIL. `normalize=False` stops at uint8: the loader then ships 4x smaller
    batches from its workers and normalises whole batches with `normalize_batch` where they are consumed
    (on the GPU in training).
    """
    ops: list = [v2.RandomResizedCrop(image_hw(image_size), scale=scale, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_layers > 0:
        ops += [TensorToPIL(), v2.RandAugment(num_ops=randaugment_layers, magnitude=randaugment_magnitude),
                PILToCHW(normalize)]
    elif normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, the same values as the per-image ToDtype + Normalize.

    One promoting multiply and one in-place add (two passes over the batch, as PILToCHW).
    """
    device = images.device
    return torch.mul(images, PILToCHW._SCALE.to(device)).add_(PILToCHW._SHIFT.to(device))


def eval_transform(image_size: ImageSize, center_crop: bool = True, crop_ratio: float = 0.875) -> v2.Compose:
    """Resize + center crop (pretraining evaluation) or resize to the full size (fine-tuning, the paper: no crop)."""
    h, w = image_hw(image_size)
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
