"""data.decode=gpu's train augmentation as a few batched kernels instead of ~10 small ones per image.

Same draws as the per-image reference (pipeline.data.device_augment.device_train_transform): for each image
torch's CPU generator is seeded with the image's seed and torchvision's own v2 transforms draw, in the same
order, the crop box (RandomResizedCrop.make_params), the flip (torch.rand(1) >= p, as v2's RandomApply
transforms draw it) and RandAugment's ops and signs (its own _get_random_item and magnitude table). So a seed
gives the same crop box, flip and ops on either path, and resume stays exact. Then, batched:

- crop + resize: one roi_align (torchvision's kernel) over all boxes to the output size. With sampling_ratio=-1
  each output pixel averages ceil(box/out) x ceil(box/out) bilinear samples: an area filter when shrinking
  (what antialias=True approximates), bilinear when enlarging. Not bit-equal to v2's antialiased resize:
  tests/test_device_augment.py bounds the difference.
- flip: one `torch.where` over the batch.
- RandAugment: v2 applies one op with one magnitude to a whole batch, so per layer the images are grouped by
  the (op, signed magnitude) they drew and each group gets one call of RandAugment's own op. Every op acts
  image by image (per-image statistics for contrast/equalize/autocontrast), so this equals the per-image
  result exactly; at most 14 ops x 2 signs calls per layer instead of one per image.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torchvision.transforms import v2

from core.units import ImageSize, image_hw

# Decoded images differ in size; roi_align wants one (K, C, H, W) tensor, so they are copied onto float canvases
# of at most this many bytes each (one huge image still gets a canvas of its own).
CANVAS_BYTES = 256 << 20


class BatchedTrainAugment:
    """uint8 CHW images of any sizes + one seed each -> uint8 (B, 3, H, W): crop, flip, RandAugment, batched."""

    def __init__(self, image_size: ImageSize, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                 scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5):
        self.size = image_hw(image_size)
        self.crop = v2.RandomResizedCrop(self.size, scale=scale, antialias=True)
        self.hflip = hflip
        self.randaugment = (v2.RandAugment(num_ops=randaugment_layers, magnitude=randaugment_magnitude)
                            if randaugment_layers > 0 else None)

    def draw(self, image: torch.Tensor, seed: int) -> tuple[list[int], bool, list[tuple[str, float]]]:
        """One image's crop box [top, left, height, width], flip and RandAugment (op, magnitude) list."""
        torch.default_generator.manual_seed(int(seed))
        box = self.crop.make_params([image])
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        ops = []
        ra = self.randaugment
        for _ in range(ra.num_ops if ra is not None else 0):
            op, (magnitudes_fn, signed) = ra._get_random_item(ra._AUGMENTATION_SPACE)
            magnitudes = magnitudes_fn(ra.num_magnitude_bins, *self.size)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[ra.magnitude])
                if signed and torch.rand(()) <= 0.5:
                    magnitude *= -1
            ops.append((op, magnitude))
        return [box["top"], box["left"], box["height"], box["width"]], flip, ops

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        state = torch.get_rng_state()
        try:
            draws = [self.draw(image, seed) for image, seed in zip(images, seeds)]
        finally:
            torch.set_rng_state(state)
        out = crop_resize(images, [d[0] for d in draws], self.size)
        flips = torch.tensor([d[1] for d in draws], device=out.device)
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
        if self.randaugment is not None:
            out = self._randaugment(out, [d[2] for d in draws])
        return out

    def _randaugment(self, out: torch.Tensor, ops: list[list[tuple[str, float]]]) -> torch.Tensor:
        """Per layer, one call of RandAugment's op per group of images that drew the same op and magnitude."""
        ra = self.randaugment
        for layer in range(ra.num_ops):
            groups: dict[tuple[str, float], list[int]] = {}
            for i, image_ops in enumerate(ops):
                groups.setdefault(image_ops[layer], []).append(i)
            for (op, magnitude), members in sorted(groups.items()):
                if op == "Identity":
                    continue
                index = torch.tensor(members, device=out.device)
                out[index] = ra._apply_image_or_video_transform(
                    out[index], op, magnitude, interpolation=ra.interpolation, fill=ra._fill)
        return out


def crop_resize(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: tuple[int, int]) -> torch.Tensor:
    """Crop each uint8 CHW image to its [top, left, height, width] box and resize it to `size`, with roi_align.

    The images go onto zero canvases of their largest size; each image's last row and column are repeated
    once past its edge so the bilinear samples next to a box on the image border never read the zero padding.
    """
    device = images[0].device
    out = torch.empty(len(images), 3, *size, dtype=torch.uint8, device=device)
    for chunk in _canvas_chunks(images):
        height = max(images[i].shape[-2] for i in chunk) + 1
        width = max(images[i].shape[-1] for i in chunk) + 1
        canvas = torch.zeros(len(chunk), 3, height, width, dtype=torch.float32, device=device)
        for slot, i in enumerate(chunk):
            h, w = images[i].shape[-2:]
            canvas[slot, :, :h, :w] = images[i]
            canvas[slot, :, h, :w] = images[i][:, -1]
            canvas[slot, :, :h + 1, w] = canvas[slot, :, :h + 1, w - 1]
        rois = torch.tensor([[slot, left, top, left + bw, top + bh]
                             for slot, (top, left, bh, bw) in enumerate(boxes[i] for i in chunk)],
                            dtype=torch.float32, device=device)
        resized = _roi_align(canvas, rois, size)
        out[torch.tensor(chunk, device=device)] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _roi_align(canvas: torch.Tensor, rois: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's roi_align kernel itself. Why not torchvision.ops.roi_align: under
    torch.use_deterministic_algorithms (our `deterministic: true`) on CUDA it switches to a torch.compile'd
    Python version (for a deterministic *backward*; compiled on first use, memory-hungry in eager). The
    kernel's forward is deterministic already, and nothing here needs a backward."""
    return torch.ops.torchvision.roi_align(canvas, rois, 1.0, size[0], size[1], -1, True)


def _canvas_chunks(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Consecutive groups of image indices whose float canvas stays under CANVAS_BYTES."""
    chunks: list[list[int]] = []
    height = width = 0
    for i, image in enumerate(images):
        h, w = max(height, image.shape[-2] + 1), max(width, image.shape[-1] + 1)
        if chunks and (len(chunks[-1]) + 1) * 3 * h * w * 4 <= CANVAS_BYTES:
            chunks[-1].append(i)
            height, width = h, w
        else:
            chunks.append([i])
            height, width = image.shape[-2] + 1, image.shape[-1] + 1
    return chunks
