"""The training process's half of the input pipeline: what happens to a batch after the workers shipped it.

Why split there: workers always ship uint8 (CHW crops, or with `data.decode=gpu` the raw JPEG bytes), 4x less
shared memory and host-to-device copy than float32, and the batch becomes float on the training device:

    finish = DeviceBatch(device, mix=batch_mix_transform(...), transform=None)   # data.decode=cpu
    images, targets = finish(batch)   # normalised float32 (B, 3, H, W) and int64 or soft targets, on `device`

Shared memory per rank is bounded by the batches in flight: (workers x prefetch_factor + 2) x micro_batch x
3 x H x W bytes (`shared_memory_bytes`); e.g. 8 x 4 + 2 batches of 512 x 224 px = 2.6 GB (float32: 10.5 GB).

Determinism: every random draw of torchvision's v2 transforms (crop boxes, flips, RandAugment ops and
magnitudes, MixUp's lambda, CutMix's box) comes from torch's CPU generator, whatever device the tensors are
on. So seeding that generator per sample (decode=gpu) and per batch (MixUp/CutMix) with seeds derived from
the stream position makes the result a pure function of the position, on any device: resume stays exact.
The trainer's own CPU RNG state is saved and put back around these draws.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Optional, Sequence

import torch
from torchvision.transforms import v2

from core.errors import UserError
from core.units import ImageSize, image_hw
from pipeline.data.batch_augment import BatchedTrainAugment
from pipeline.data.transforms import multi_hot, normalize_batch

DECODES = ("cpu", "gpu")
log = logging.getLogger("pipeline.data.loader")

# torchvision 0.29 announces a move of its decoders to TorchCodec; decode_jpeg is still its GPU decoder.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def shared_memory_bytes(num_workers: int, prefetch_factor: int, micro_batch_size: int, image_size: ImageSize) -> int:
    """Upper bound of the uint8 image bytes a rank's DataLoader holds in shared memory at once.

    Each worker keeps up to `prefetch_factor` batches queued; the pin-memory thread and the consumer hold one
    more each. (With data.decode=gpu the batches hold JPEG bytes instead, typically 5-10x less.)
    """
    h, w = image_hw(image_size)
    in_flight = max(1, num_workers) * (prefetch_factor if num_workers else 1) + 2
    return in_flight * micro_batch_size * 3 * h * w


def check_decode(decode: str, device: torch.device) -> None:
    """Refuse data.decode=gpu in one line where there is no CUDA device to decode on."""
    if decode not in DECODES:
        raise UserError(f"data.decode must be one of {', '.join(DECODES)}; got {decode!r}")
    if decode == "gpu" and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise UserError(f"data.decode=gpu decodes JPEGs on a CUDA GPU, but this rank trains on "
                        f"{torch.device(device).type} (no GPU visible); set data.decode=cpu (the default)")


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Seed torch's CPU generator for the draws inside, then give the caller's RNG state back.

    Only the CPU generator: torch.manual_seed would also queue CUDA seeding, and torchvision draws on CPU.
    """
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(int(seed))
        yield
    finally:
        torch.set_rng_state(state)


def device_train_transform(image_size: ImageSize, randaugment_layers: int = 2, randaugment_magnitude: int = 15,
                           scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5) -> v2.Compose:
    """The train augmentation on uint8 CHW tensors on any device, image by image: crop, flip, RandAugment.

    data.decode=gpu runs pipeline.data.batch_augment.BatchedTrainAugment, which draws exactly as this does per
    seed; this stays as its reference (tests, benchmarks/gpu_check.py's `augment` figure).

    The same ops and parameters as pipeline.data.transforms.train_transform, all on tensors (no PIL on a GPU), so
    the images are not bit-identical to the CPU path's but follow the same distribution.
    """
    ops: list = [v2.RandomResizedCrop(image_hw(image_size), scale=scale, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_layers > 0:
        ops.append(v2.RandAugment(num_ops=randaugment_layers, magnitude=randaugment_magnitude))
    return v2.Compose(ops)


def pack_jpegs(blobs: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG byte strings -> one flat uint8 tensor and (B + 1) offsets.

    Why one tensor: a list of B tensors would cross from a worker as B shared-memory segments (B file
    descriptors per batch); one buffer is one segment and one pinned copy.
    """
    lengths = torch.tensor([0] + [len(b) for b in blobs], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if sum(map(len, blobs)) else \
        torch.empty(0, dtype=torch.uint8)
    return flat, torch.cumsum(lengths, 0)


def unpack_jpegs(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of pack_jpegs: views into `flat`, one 1-D uint8 tensor per JPEG."""
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def decode_on_device(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEGs to uint8 RGB CHW tensors on `device`: one batched call (nvJPEG on CUDA).

    If the batched call fails (one JPEG the GPU decoder does not take, e.g. CMYK or progressive on some
    versions), each image is decoded alone, falling back to the CPU decoder for the ones that still fail. A
    JPEG whose headers passed the workers' check but whose data no decoder reads becomes a black image with
    a warning: the batch keeps its size (every rank must step alike) and training goes on.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for data in jpegs:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    out.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
                except RuntimeError as exn:
                    log.warning("undecodable JPEG (%d bytes) replaced by a black image: %s", data.numel(), exn)
                    out.append(torch.zeros(3, 8, 8, dtype=torch.uint8, device=device))
        return out


def augment_on_device(jpegs: Sequence, seeds: Sequence[int], device: torch.device,
                      transform: Optional[Callable] = None, image_size: ImageSize = 224) -> torch.Tensor:
    """Decode a batch of JPEGs on `device` and augment them there: uint8 (B, 3, H, W) on `device`.

    `jpegs`: bytes or 1-D uint8 CPU tensors; `seeds`: one per image (pipeline.data.loader derives it from the
    sample's stream position), so each image's crop, flip and RandAugment are a pure function of its seed.
    `transform`: a BatchedTrainAugment (the default, for image_size; what data.decode=gpu runs) takes the whole
    batch; any other callable (device_train_transform, the per-image reference) runs image by image.
    Runs on CPU tensors too (the tests do).
    """
    if len(jpegs) != len(seeds):
        raise ValueError(f"{len(jpegs)} JPEGs but {len(seeds)} seeds")
    transform = transform or BatchedTrainAugment(image_size)
    tensors = [j if isinstance(j, torch.Tensor) else torch.frombuffer(bytearray(j), dtype=torch.uint8)
               for j in jpegs]
    images = decode_on_device(tensors, device)
    if isinstance(transform, BatchedTrainAugment):
        return transform(images, seeds)
    out = []
    state = torch.get_rng_state()
    try:
        for image, seed in zip(images, seeds):
            torch.default_generator.manual_seed(int(seed))
            out.append(transform(image))
    finally:
        torch.set_rng_state(state)
    return torch.stack(out)


class DeviceBatch:
    """A worker's batch dict -> (normalised float32 images, targets) on `device`.

    `transform` set: the batch holds JPEG bytes (data.decode=gpu) that are decoded and augmented on the
    device; otherwise it holds uint8 crops. MixUp/CutMix (`mix`) run after normalisation, seeded by the
    batch's `mix_seed`, exactly as the workers used to run them on CPU. `num_classes` set: the labels are
    padded label lists (a multi-label split) and become multi-hot float (B, num_classes) here, before `mix`
    (then pipeline.data.transforms.MultiHotMix).

    With data.decode=gpu on CUDA, `launch` queues a batch's decode and augmentation on a side stream
    (`self.stream`) and returns at once; the loader launches batch N+1 before handing out batch N, so that
    work overlaps batch N's step. Elsewhere `stream` is None and `launch` finishes the batch in place.
    """

    def __init__(self, device: torch.device, mix: Optional[Callable] = None, transform: Optional[Callable] = None,
                 num_classes: Optional[int] = None, side_stream: bool = True):
        self.device = torch.device(device)
        self.mix, self.transform, self.num_classes = mix, transform, num_classes
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if side_stream and transform is not None and on_cuda else None

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"].to(self.device, non_blocking=True)
        if self.num_classes is not None:
            labels = multi_hot(labels, self.num_classes)
        if "jpeg" in batch:
            jpegs = unpack_jpegs(batch["jpeg"], batch["jpeg_offsets"])
            images = augment_on_device(jpegs, batch["seeds"].tolist(), self.device, self.transform)
        else:
            images = batch["images"].to(self.device, non_blocking=True)
        images = normalize_batch(images)
        if self.mix is not None:
            with seeded_cpu_rng(batch["mix_seed"]):
                images, labels = self.mix(images, labels)
        return images, labels

    def launch(self, batch: dict) -> "PendingBatch":
        """Start finishing `batch`: queued on the side stream where there is one, else done now."""
        if self.stream is None:
            return PendingBatch(self(batch))
        # No wait on the compute stream: the inputs are host tensors, and waiting would serialise with the step.
        with torch.cuda.stream(self.stream):
            result = self(batch)
            event = torch.cuda.Event()
            event.record(self.stream)
        return PendingBatch(result, event, self.device)


class PendingBatch:
    """A finished or in-flight (images, targets); `wait()` makes the current stream wait for it and returns it."""

    def __init__(self, result: tuple[torch.Tensor, torch.Tensor], event=None, device=None):
        self.result, self.event, self.device = result, event, device

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            for tensor in self.result:  # made on the side stream: the allocator must not reuse them under the step
                tensor.record_stream(current)
        return self.result
