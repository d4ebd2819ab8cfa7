"""The training input pipeline on shards that data_prep made: splitting, determinism, exact resume, corruption.

The `demo_shards` fixture (tests/conftest.py) runs the real `python -m data_prep demo-data` and `shard` CLIs
once per session.
"""
import json
import shutil
import tarfile

import pytest
import torch

# torchvision 0.29 announces its decoders' move to TorchCodec on every decode; the pipeline still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

from core.errors import UserError
from pipeline.checkpoint.layout import complete_checkpoints, latest_complete, prune, write_marker
from pipeline.data.loader import TrainLoader, shards_of_pass
from pipeline.data.shards import open_shards

from tests.conftest import DEMO_SHARD_CLASSES as NUM_CLASSES


def _loader(shards, state=None, rank=0, world=2, workers=2, mix=0.0, micro=8):
    return TrainLoader(shards, seed=3, rank=rank, world_size=world, num_workers=workers, micro_batch_size=micro,
                       image_size=32, num_classes=NUM_CLASSES, shuffle_buffer=40, state=state, mixup_alpha=mix,
                       cutmix_alpha=mix)


@pytest.mark.slow  # data_prep's Ray sharding builds the fixture
def test_open_shards_folder_and_pattern(demo_shards):
    train = open_shards(str(demo_shards), "train")
    assert train.num_samples == 160 and sum(train.shard_lengths) == 160 and len(train.urls) == 5
    assert train.classes is not None and len(train.classes) == NUM_CLASSES
    pattern = open_shards(str(demo_shards / "train-{000000..000004}.tar"), "train")
    assert pattern.urls == train.urls and pattern.shard_lengths == train.shard_lengths
    with pytest.raises(UserError, match="no split 'test'"):
        open_shards(str(demo_shards), "test")
    with pytest.raises(UserError, match="neither a folder"):
        open_shards(str(demo_shards / "missing"), "train")


def test_every_pass_splits_all_shards_over_streams():
    for num_shards, streams in ((5, 4), (2, 4), (8, 2)):
        for p in range(6):
            parts = [shards_of_pass(0, p, num_shards, s, streams) for s in range(streams)]
            flat = sorted(i for part in parts for i in part)
            assert flat == list(range(num_shards))  # each shard read by exactly one stream per pass
    # N < S: every stream still gets shards within a few passes (round robin carries over passes)
    got = {s for p in range(4) for s in range(4) if shards_of_pass(0, p, 2, s, 4)}
    assert got == {0, 1, 2, 3}


@pytest.mark.slow  # data_prep's Ray sharding builds the fixture
def test_ranks_read_different_samples_and_order_is_seeded(demo_shards):
    shards = open_shards(str(demo_shards), "train")
    a = _loader(shards, rank=0)
    b = _loader(shards, rank=1)
    xa = torch.cat([next(a)[0] for _ in range(4)])
    xb = torch.cat([next(b)[0] for _ in range(4)])
    assert not torch.equal(xa, xb)
    again = _loader(shards, rank=0)
    assert torch.equal(xa, torch.cat([next(again)[0] for _ in range(4)]))


@pytest.mark.slow
@pytest.mark.parametrize("workers,mix", [(2, 0.0), (0, 0.8)])
def test_resume_mid_stream_is_exact(demo_shards, workers, mix):
    """Stop after 7 batches, restart from state_dict(): the next batches are bit-identical (images, targets)."""
    shards = open_shards(str(demo_shards), "train")
    full = _loader(shards, workers=workers, mix=mix)
    reference = [next(full) for _ in range(16)]  # > one pass of this rank's streams
    first = _loader(shards, workers=workers, mix=mix)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it travels through a checkpoint
    first.close()
    resumed = _loader(shards, state=state, workers=workers, mix=mix)
    for x, y in reference[7:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    if mix:
        assert reference[0][1].shape == (8, NUM_CLASSES)  # soft targets from MixUp/CutMix


@pytest.mark.slow  # data_prep's Ray sharding builds the fixture
def test_truncated_shard_is_skipped_and_counted(demo_shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(demo_shards, bad)
    victim = bad / "train-000001.tar"
    with tarfile.open(victim) as tf:
        cut = tf.getmembers()[12].offset  # exactly at a header: tarfile alone would read a valid, shorter archive
    victim.write_bytes(victim.read_bytes()[:cut])
    shards = open_shards(str(bad), "train")
    loader = _loader(shards, world=1, workers=0)
    with caplog.at_level("WARNING", logger="pipeline.data.loader"):
        batches = [next(loader) for _ in range(25)]  # > one pass over all 5 shards
    assert all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    assert loader.corrupt_count >= 1
    assert "skipped corrupt data" in caplog.text and "train-000001.tar" in caplog.text
    assert "read 4 of its 32 samples" in caplog.text  # 3 members per sample: 12 members = 4 samples


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        tag = tmp_path / f"step_{step:08d}"
        tag.mkdir()
        if complete:
            write_marker(str(tag), {"step": step, "world_size": 2, "zero_stage": 2})
    (tmp_path / "latest").write_text("step_00000006")  # DeepSpeed's pointer to the half-written save
    assert latest_complete(str(tmp_path)).step == 4
    prune(str(tmp_path), keep=1)
    assert [c.step for c in complete_checkpoints(str(tmp_path))] == [4]
    assert (tmp_path / "step_00000006").exists()  # newer than the newest complete: may still be in progress


def test_batch_normalisation_matches_the_per_image_transform():
    """normalize_batch (uint8 batches normalised on the training device) gives the per-image transform's values."""
    from torchvision.transforms import v2

    from pipeline.data.transforms import MEAN, STD, normalize_batch

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    expected = torch.stack([per_image(img) for img in images])
    assert torch.allclose(normalize_batch(images), expected, atol=1e-6, rtol=0)


def test_hand_written_pil_conversion_matches_torchvision_and_augmentation_is_seeded():
    """PILToCHW replaces v2.PILToTensor + ToDtype + Normalize for speed; its values must stay theirs, and the
    RandAugment path through PIL must stay a pure function of the seed (exact resume relies on it)."""
    from torchvision.transforms import v2

    from pipeline.data.transforms import MEAN, STD, PILToCHW, TensorToPIL, normalize_batch, train_transform

    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    reference = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(image))
    pil = TensorToPIL()(image)
    assert torch.allclose(PILToCHW(normalize=True)(pil), reference, atol=1e-6)
    assert torch.equal(PILToCHW(normalize=False)(pil), image)
    assert torch.allclose(normalize_batch(image[None]), reference[None], atol=1e-6)
    transform = train_transform(32, randaugment_layers=2, randaugment_magnitude=15)
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert outputs[0].shape == (3, 32, 32) and outputs[0].dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


@pytest.mark.slow  # data_prep's Ray sharding builds the fixture
def test_in_process_loading_leaves_the_trainers_rng_alone(demo_shards):
    """With num_workers=0 the per-sample seeding runs in the training process: the trainer's own draws
    (stochastic depth, dropout) must follow the trainer's seed, not the data's."""
    draws = []
    for trainer_seed in (1, 2):
        loader = _loader(open_shards(str(demo_shards), "train"), rank=0, world=1, workers=0)
        torch.manual_seed(trainer_seed)
        expected = torch.rand(3)
        torch.manual_seed(trainer_seed)
        it = iter(loader)
        next(it)
        assert torch.equal(torch.rand(3), expected)
        next(it)
        draws.append(torch.rand(3))
        loader.close()
    assert not torch.equal(draws[0], draws[1])
