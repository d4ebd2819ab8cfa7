"""data.decode=gpu's batched augmentation (pipeline.data.batch_augment) against the per-image reference, on CPU."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.batch_augment import CANVAS_BYTES, BatchedTrainAugment, _canvas_chunks, crop_resize
from pipeline.data.device_augment import DeviceBatch, augment_on_device, device_train_transform, pack_jpegs


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A smooth random image (so interpolation differences stay small, flips and crops do not), as JPEG."""
    small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [_jpeg(rng, 40 + 7 * (i % 5), 48 + 9 * (i % 4)) for i in range(24)]


def test_batched_crop_and_flip_follow_the_per_image_draws(jpegs):
    """Same seed -> same crop box and flip: images equal up to the resize filter (roi_align's area average vs
    v2's antialiased bilinear), far below what another box or a missed flip gives."""
    seeds = list(range(100, 124))
    reference = augment_on_device(jpegs, seeds, "cpu", device_train_transform(32, randaugment_layers=0)).float()
    batched = augment_on_device(jpegs, seeds, "cpu", BatchedTrainAugment(32, randaugment_layers=0)).float()
    per_image = (batched - reference).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 4.0, per_image  # uint8 levels; measured 0.46 (another seed: 49)
    other = augment_on_device(jpegs, [s + 1000 for s in seeds], "cpu", BatchedTrainAugment(32, randaugment_layers=0))
    assert (other.float() - reference).abs().mean(dim=(1, 2, 3)).median() > 3 * per_image.median()


def test_grouped_randaugment_equals_torchvisions_per_image_randaugment():
    """Grouping images by the op drawn changes nothing: bit-equal to v2.RandAugment image by image."""
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(64, 3, 6, 6, generator=gen), size=(32, 32),
                                             mode="bilinear").mul(255).to(torch.uint8)
    aug = BatchedTrainAugment(32, randaugment_layers=2, randaugment_magnitude=15)
    seeds = list(range(64))
    ops = [aug.draw(image, seed)[2] for image, seed in zip(images, seeds)]
    assert len({op for image_ops in ops for op, _ in image_ops}) >= 10  # the batch exercises most ops
    got = aug._randaugment(images.clone(), ops)
    for image, seed, out in zip(images, seeds, got):
        torch.default_generator.manual_seed(seed)  # the reference's draws: crop, flip, then RandAugment
        aug.crop.make_params([image])
        torch.rand(1)
        assert torch.equal(aug.randaugment(image), out)


def test_batched_augmentation_is_a_function_of_each_seed_and_leaves_the_rng_alone(jpegs):
    aug = BatchedTrainAugment(32)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    out = augment_on_device(jpegs, list(range(24)), "cpu", aug)
    assert torch.equal(torch.get_rng_state(), before)
    assert out.shape == (24, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(augment_on_device(jpegs, list(range(24)), "cpu", aug), out)
    again = augment_on_device(jpegs[::-1], list(range(24))[::-1], "cpu", aug)
    assert torch.equal(again.flip(0), out)  # each image depends on its own seed only, not on its batch
    assert not torch.equal(augment_on_device(jpegs, list(range(1, 25)), "cpu", aug), out)


def test_crop_resize_reads_no_padding_and_splits_big_batches():
    """Boxes on the right/bottom edge of images smaller than their canvas: an image of one colour stays that
    colour (the zero padding would darken its edge); chunks keep each canvas under CANVAS_BYTES."""
    images = [torch.full((3, h, w), 200, dtype=torch.uint8) for h, w in ((20, 30), (50, 17), (33, 33))]
    boxes = [[5, 10, 15, 20], [10, 0, 40, 17], [0, 0, 33, 33]]
    out = crop_resize(images, boxes, (24, 24))
    assert torch.equal(out, torch.full_like(out, 200))
    side = int((CANVAS_BYTES / 12 / 3) ** 0.5)  # three such images fill one canvas
    chunks = _canvas_chunks([torch.empty(3, side, side)] * 7)
    assert [len(c) for c in chunks] == [2, 2, 2, 1] and sum(chunks, []) == list(range(7))


def test_device_batch_uses_no_side_stream_without_cuda(jpegs):
    """On CPU the stream code path is skipped: `launch` finishes the batch at once, same as calling it."""
    finish = DeviceBatch(torch.device("cpu"), transform=BatchedTrainAugment(32))
    assert finish.stream is None
    flat, offsets = pack_jpegs(jpegs[:4])
    batch = {"jpeg": flat, "jpeg_offsets": offsets, "seeds": torch.arange(4), "labels": torch.tensor([0, 1, 2, 0])}
    pending = finish.launch(batch)
    assert pending.event is None
    images, labels = pending.wait()
    want_images, want_labels = finish(batch)
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
