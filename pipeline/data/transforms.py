"""Image transforms (torchvision.transforms.v2) shared by training, evaluation and the benchmarks.

Every transform works on uint8 CHW tensors straight from `torchvision.io.decode_image` and ends in
float32 normalised with the ImageNet mean/std (timm's IMAGENET_DEFAULT_MEAN/STD values). v2 transforms
draw from torch's global RNG; pipeline.data.loader seeds it per sample, which is what makes augmentation a pure
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
    """uint8 CHW tensor -> PIL RGB image (for the ops that are cheaper on PIL images).

    A CHW view of HWC memory (what the decoder and RandomResizedCropHWC give) goes to PIL as it is; planar
    memory is interleaved by PIL's merge, 5x faster than torch's uint8 transpose copy (0.05 vs 0.27 ms per
    224 px image, measured here). Same pixels either way.
    """

    def forward(self, image: torch.Tensor) -> Image.Image:
        hwc = image.permute(1, 2, 0)
        if hwc.is_contiguous():
            return Image.fromarray(hwc.numpy())
        _, h, w = image.shape
        planes = image.contiguous().numpy()
        return Image.merge("RGB", [Image.frombuffer("L", (w, h), plane, "raw", "L", 0, 1) for plane in planes])


class RandomResizedCropHWC(v2.RandomResizedCrop):
    """v2.RandomResizedCrop with the same random draws and the same pixels, kept in HWC memory.

    Why: copying the crop into HWC memory first (rows of a decoded image are HWC already) lets torchvision's
    uint8 resize stay channels-last, its fast path, and the result reaches PIL without a transpose: 0.13 ms
    instead of 0.23 ms for the resize of a 224 px crop, measured here. Other inputs go to the parent.
    """

    def transform(self, inpt, params):
        if not (type(inpt) is torch.Tensor and inpt.dim() == 3 and inpt.dtype == torch.uint8
                and inpt.device.type == "cpu"):
            return super().transform(inpt, params)
        crop = v2.functional.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return v2.functional.resize(crop, self.size, interpolation=self.interpolation, antialias=self.antialias)


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
        if self.normalize:
            chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
            return torch.mul(chw, self._SCALE).add_(self._SHIFT)
        # uint8: PIL's own band split is the planar copy, 1.6x faster than torch's transpose (0.10 vs 0.17 ms).
        w, h = image.size
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        planes = bytearray(b"".join(band.tobytes() for band in rgb.split()))
        return torch.frombuffer(planes, dtype=torch.uint8).view(3, h, w)


def train_transform(image_size: ImageSize, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, normalize: bool = True) -> v2.Compose:
    """Inception-style crop, flip, RandAugment(n, m) (the paper's recipe), then normalise.

    Input: a uint8 CHW tensor from torchvision's decoder. Crop and flip run on the tensor (1.8x faster
    than on PIL here); RandAugment runs on a PIL image, where its ops are 3x faster than on tensors
    (0.35 vs 1.02 ms per 224 px image, measured with torchvision 0.29). Together 15% less CPU per image
    than either all-tensor or all-PIL. `normalize=False` stops at uint8, which is what the training loader
    uses: its workers ship 4x smaller batches and `normalize_batch` normalises whole batches on the training
    device (pipeline.data.device_augment).
    """
    ops: list = [RandomResizedCropHWC(image_hw(image_size), scale=scale, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_layers > 0:
        ops += [TensorToPIL(), v2.RandAugment(num_ops=randaugment_layers, magnitude=randaugment_magnitude),
                PILToCHW(normalize)]
    elif normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


_DEVICE_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, the same values as the per-image ToDtype + Normalize.

    One promoting multiply and one in-place add (as PILToCHW, so the values are bit-identical to it). The
    mean/std constants are copied to a device once and kept there. On the CPU image by image, so the second
    pass finds the image in cache (half the time of two passes over a 38 MB batch, measured here); on an
    accelerator the whole batch at once (two kernels).
    """
    device = images.device
    if device not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[device] = (PILToCHW._SCALE.to(device), PILToCHW._SHIFT.to(device))
    scale, shift = _DEVICE_CONSTANTS[device]
    if device.type != "cpu" or images.dim() != 4:
        return torch.mul(images, scale).add_(shift)
    out = torch.empty(images.shape, dtype=torch.float32)
    for image, dest in zip(images, out):
        torch.mul(image, scale, out=dest).add_(shift)
    return out


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


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label lists padded with -1, int64 (B, L) -> multi-hot float32 (B, num_classes) on the same device.

    A scatter into a spare last column for the padding, not boolean-mask indexing: a mask's selection has a
    data-dependent size, which costs a device-to-host sync per micro-batch on GPUs.
    """
    index = labels.masked_fill(labels < 0, num_classes)
    out = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.float32, device=labels.device)
    out.scatter_(1, index, 1.0)
    return out[:, :num_classes].contiguous()


class MultiHotMix:
    """MixUp and/or CutMix for multi-hot targets (B, C), with torchvision's own draws.

    torchvision's v2 MixUp/CutMix take integer labels only. So the batch goes through them with the labels
    0..B-1 (num_classes=B): the (B, B) soft targets they return are the mixing weights themselves, w[i, i] =
    lambda (CutMix: the area-corrected lambda) and w[i, i-1] = 1 - lambda (they pair each image with the one
    before it, `roll(1)`). The multi-hot targets are mixed with exactly those weights:
    t'_i = lambda t_i + (1 - lambda) t_{i-1}. The random draws (which op, lambda, the box) are the same as
    batch_mix_transform's for the same seed, and for one-hot targets the result equals its soft targets bit
    for bit (tests/test_multilabel_training.py), so a per-batch seed keeps resume exact here too.
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MultiHotMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.alphas = (mixup_alpha, cutmix_alpha)
        self._by_batch: dict[int, object] = {}

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = images.shape[0]
        if size not in self._by_batch:
            self._by_batch[size] = batch_mix_transform(size, *self.alphas)
        images, weights = self._by_batch[size](images, torch.arange(size, device=images.device))
        if size < 2:  # an image mixed with itself keeps its targets
            return images, targets
        index = torch.arange(size, device=weights.device)
        own, other = weights[index, index], weights[index, index - 1]
        return images, targets * own[:, None] + targets.roll(1, 0) * other[:, None]
