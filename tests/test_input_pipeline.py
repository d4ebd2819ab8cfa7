"""Issue 10's input pipeline: uint8 from the workers, normalise + MixUp/CutMix on the device, data.decode=gpu.

Fast (no Ray): the shards are written here with webdataset's TarWriter, the format data_prep writes
(`jpg` + `cls`), including one damaged JPEG that every path must skip and count.
"""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

from core.errors import UserError
from pipeline.config import ConfigError, load_config
from pipeline.data.loader import TrainLoader, TrainStream, build_train_loader
from pipeline.data.device_augment import (DeviceBatch, PendingBatch, augment_on_device, check_decode,
                                          device_train_transform, pack_jpegs, seeded_cpu_rng, shared_memory_bytes,
                                          unpack_jpegs)
from pipeline.data.shards import ShardSet
from pipeline.data.transforms import (PILToCHW, RandomResizedCropHWC, TensorToPIL, batch_mix_transform, normalize_batch,
                                 train_transform)

CLASSES, SHARDS, PER_SHARD = 3, 4, 12


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A smooth random image (noise would make every crop look alike), as JPEG bytes."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    root = tmp_path_factory.mktemp("input-pipeline")
    rng = np.random.default_rng(0)
    urls = []
    for s in range(SHARDS):
        url = str(root / f"train-{s:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(PER_SHARD):
                data = _jpeg(rng, 40 + 4 * (i % 3), 48)
                if (s, i) == (1, 5):
                    data = data[:40] + b"\x00" * 40  # damaged: header cut short
                sink.write({"__key__": f"{s:02d}{i:04d}", "jpg": data, "cls": str((s + i) % CLASSES).encode()})
        urls.append(url)
    return ShardSet(urls, [PER_SHARD] * SHARDS, SHARDS * PER_SHARD, [f"c{k}" for k in range(CLASSES)])


def _loader(shards, state=None, workers=0, mix=0.8, randaugment=2, decode="cpu", worker_start="fork"):
    return TrainLoader(shards, seed=5, rank=0, world_size=1, num_workers=workers, micro_batch_size=6,
                       image_size=32, randaugment_layers=randaugment, num_classes=CLASSES, shuffle_buffer=10,
                       mixup_alpha=mix, cutmix_alpha=mix, state=state, decode=decode, worker_start=worker_start)


def _old_float_batches(shards, n, mix, randaugment):
    """The pipeline as it was: workers normalise each image to float32, then MixUp/CutMix the float batch."""
    stream = TrainStream(shards, seed=5, rank=0, world_size=1, num_workers=0, micro_batch_size=6,
                         transform=train_transform(32, randaugment, 15, normalize=True), shuffle_buffer=10,
                         num_classes=CLASSES)
    mixer = batch_mix_transform(CLASSES, mix, mix) if mix else None
    out = []
    for batch in stream:
        x, y = batch["images"], batch["labels"]
        if mixer is not None:
            with seeded_cpu_rng(batch["mix_seed"]):
                x, y = mixer(x, y)
        out.append((x, y))
        if len(out) == n:
            return out


@pytest.mark.parametrize("mix,randaugment", [(0.0, 2), (0.8, 2), (0.8, 0)])
def test_uint8_pipeline_gives_the_old_float_batches(shards, mix, randaugment):
    loader = _loader(shards, mix=mix, randaugment=randaugment)
    for (x_old, y_old) in _old_float_batches(shards, 5, mix, randaugment):
        x, y = next(loader)
        assert x.dtype == torch.float32 and x.shape == (6, 3, 32, 32) and x.is_contiguous()
        if randaugment:  # the same two float ops as the old per-image path: bit-identical
            assert torch.equal(x, x_old)
        else:  # the old path used v2.ToDtype + Normalize: equal up to float rounding
            assert torch.allclose(x, x_old, atol=2e-6, rtol=0)
        assert torch.equal(y, y_old)


def test_workers_ship_uint8_and_labels(shards):
    stream = _loader(shards, workers=0).dataset
    batch = next(iter(stream))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (6, 3, 32, 32)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (6,)
    gpu = next(iter(_loader(shards, decode="gpu").dataset))
    assert "images" not in gpu and gpu["jpeg"].dtype == torch.uint8 and gpu["seeds"].shape == (6,)
    # 8 workers x prefetch 4 (+2) batches of 512 x 224 px uint8: 2.6 GB per rank, a quarter of float32's
    assert shared_memory_bytes(8, 4, 512, 224) == 34 * 512 * 3 * 224 * 224


@pytest.mark.parametrize("decode,workers", [("cpu", 2), ("gpu", 0), ("gpu", 2)])
def test_mix_on_device_is_deterministic_and_resume_exact(shards, decode, workers):
    reference = [next(_loader(shards, workers=workers, decode=decode)) for _ in range(1)]
    full = _loader(shards, workers=workers, decode=decode)
    batches = [next(full) for _ in range(10)]  # > one pass (47 readable samples, batches of 6)
    assert torch.equal(batches[0][0], reference[0][0]) and batches[0][1].shape == (6, CLASSES)
    first = _loader(shards, workers=workers, decode=decode)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _loader(shards, state=state, workers=workers, decode=decode)
    for x, y in batches[4:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert full.corrupt_count >= 1  # the damaged JPEG, skipped and counted (once per pass) in both paths


def test_forkserver_workers_give_the_forked_workers_batches(shards):
    """data.worker_start=forkserver (auto on GPUs): workers from a clean process, same batches as forked ones."""
    forked = _loader(shards, workers=2)
    served = _loader(shards, workers=2, worker_start="forkserver")
    for _ in range(10):  # > one pass
        (x, y), (sx, sy) = next(forked), next(served)
        assert torch.equal(x, sx) and torch.equal(y, sy)
    assert served.loader.multiprocessing_context.get_start_method() == "forkserver"
    cfg = load_config(None, ["data.num_workers=2"])
    assert build_train_loader(cfg, shards, 0, 1, CLASSES).loader.multiprocessing_context.get_start_method() == "fork"
    with pytest.raises(ConfigError, match="data.worker_start"):
        load_config(None, ["data.worker_start=spawn"])


def test_device_batch_leaves_the_trainers_rng_alone_and_seeds_per_batch(shards):
    batch = next(iter(_loader(shards).dataset))
    finish = DeviceBatch(torch.device("cpu"), mix=batch_mix_transform(CLASSES, 0.8, 1.0))
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    a = finish(batch)
    assert torch.equal(torch.rand(3), expected)
    b = finish(batch)
    c = finish({**batch, "mix_seed": batch["mix_seed"] + 1})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_normalisation_constants_stay_on_the_device():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    normalize_batch(images)
    from pipeline.data.transforms import _DEVICE_CONSTANTS
    cached = _DEVICE_CONSTANTS[images.device]
    normalize_batch(images)
    assert _DEVICE_CONSTANTS[images.device] is cached
    whole = torch.mul(images, PILToCHW._SCALE).add_(PILToCHW._SHIFT)
    assert torch.equal(normalize_batch(images), whole)  # image by image on CPU: the same values


def test_augment_on_device_runs_on_cpu_tensors_and_is_seeded(shards):
    rng = np.random.default_rng(1)
    jpegs = [_jpeg(rng, 40, 48 + 8 * i) for i in range(4)]
    transform = device_train_transform(32, randaugment_layers=2, randaugment_magnitude=15)
    out = augment_on_device(jpegs, [1, 2, 3, 4], "cpu", transform)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8 and out.device.type == "cpu"
    again = augment_on_device(jpegs[::-1], [4, 3, 2, 1], "cpu", transform)
    assert torch.equal(again.flip(0), out)  # each image a function of its own seed, not of its batch
    assert not torch.equal(augment_on_device(jpegs, [5, 6, 7, 8], "cpu", transform), out)
    flat, offsets = pack_jpegs(jpegs)
    assert [bytes(t.numpy()) for t in unpack_jpegs(flat, offsets)] == jpegs
    with pytest.raises(ValueError, match="seeds"):
        augment_on_device(jpegs, [1], "cpu", transform)


def test_decode_gpu_is_refused_without_a_gpu(shards, tmp_path):
    with pytest.raises(UserError) as err:
        check_decode("gpu", torch.device("cpu"))
    message = str(err.value)
    assert "data.decode=gpu" in message and "data.decode=cpu" in message and "\n" not in message
    check_decode("cpu", torch.device("cpu"))
    cfg = load_config(None, ["data.decode=gpu", "data.prefetch_factor=2"])
    assert cfg.data.decode == "gpu" and cfg.data.prefetch_factor == 2
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="data.decode=gpu"):
            build_train_loader(cfg, shards, 0, 1, CLASSES, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(None, ["data.decode=tpu"])
    with pytest.raises(ConfigError, match="data.prefetch_factor"):
        load_config(None, ["data.prefetch_factor=0"])


def test_fast_tensor_pil_conversions_keep_torchvisions_pixels():
    """RandomResizedCropHWC, TensorToPIL and PILToCHW take faster routes; the pixels must stay torchvision's."""
    from torchvision.transforms import v2

    hwc = torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8)
    chw_view, planar = hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()
    for image in (chw_view, planar):
        assert np.array_equal(np.asarray(TensorToPIL()(image)), hwc.numpy())
        for seed in range(5):
            torch.manual_seed(seed)
            ours = RandomResizedCropHWC(24, antialias=True)(image)
            torch.manual_seed(seed)
            assert torch.equal(ours, v2.RandomResizedCrop(24, antialias=True)(image))
    pil = Image.fromarray(hwc.numpy())
    assert torch.equal(PILToCHW(normalize=False)(pil), planar)
    assert torch.equal(PILToCHW(normalize=False)(pil.convert("L")), v2.PILToTensor()(pil.convert("RGB").convert("L").convert("RGB")))


def test_a_jpeg_no_decoder_reads_becomes_a_black_image_not_a_crash(caplog):
    rng = np.random.default_rng(2)
    good = _jpeg(rng, 40, 48)
    bad = good[:200] + b"\xff" * 50 + good[-2:]  # headers intact (the workers' check passes), data destroyed
    with caplog.at_level("WARNING", logger="pipeline.data.loader"):
        out = augment_on_device([good, bad], [1, 2], "cpu", device_train_transform(32, randaugment_layers=0))
    assert out.shape == (2, 3, 32, 32) and int(out[1].max()) == 0
    assert "replaced by a black image" in caplog.text


def test_reading_one_batch_ahead_for_the_side_stream_keeps_resume_exact(shards):
    """On CUDA with decode=gpu the loader launches batch N+1 before handing out N. Shown on CPU by giving the
    loader's DeviceBatch a stand-in stream (launch itself stays the CPU one): the state after 4 batches
    resumes at batch 5, not 6, and the batches are those of a loader that reads no batch ahead."""
    plain = _loader(shards, decode="gpu")
    want = [next(plain) for _ in range(7)]
    ahead = _loader(shards, decode="gpu")
    ahead.finish.stream = "stand-in"  # what the loader checks; the batches are still finished at once on CPU
    ahead.finish.launch = lambda batch: PendingBatch(ahead.finish(batch))
    for x, y in want[:4]:
        rx, ry = next(ahead)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert ahead._ahead is not None  # batch 5 is already in flight
    state = json.loads(json.dumps(ahead.state_dict()))
    assert state == json.loads(json.dumps(_state_after(shards, 4)))
    resumed = _loader(shards, state=state, decode="gpu")
    for x, y in want[4:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)


def _state_after(shards, n: int) -> dict:
    loader = _loader(shards, decode="gpu")
    for _ in range(n):
        next(loader)
    return loader.state_dict()
