"""Weighted mixtures of training sources (`data.train` as a list): the schedule, the config's one-line errors,
the class check, the draw per source on real shards, and exact resume on another world size through the
real deepspeed launcher.

The two sources share one class list of four classes; source `a` holds images of classes 0-1 only and source
`b` of classes 2-3 only, so a batch's labels tell which source each image came from.
"""
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

from core.errors import UserError
from pipeline.config import ConfigError, load_config
from pipeline.data.loader import MixturePlan, TrainLoader, loader_state_for_rank
from pipeline.data.mixture import MixtureSchedule
from pipeline.data.sources import open_train

from tests.test_pipeline_train import base_overrides, deepspeed_cmd, metrics, run

CLASSES = ["ant", "bee", "cat", "dog"]
MIX = [{"path": "A", "weight": 3, "name": "a"}, {"path": "B", "weight": 1, "name": "b"}]


def write_source(folder: Path, labels: tuple[int, ...], per_shard: int, shards: int, seed: int,
                 classes=CLASSES) -> Path:
    """A shard folder as data_prep writes it (tars of jpg/cls + _info.json), images of the given labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names, lengths = [], []
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(per_shard):
                label = labels[(s * per_shard + i) % len(labels)]
                buf = io.BytesIO()
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                pixels[..., label % 3] = 200 + 10 * label  # a class colour on noise: learnable, cheap
                Image.fromarray(pixels).save(buf, "JPEG", quality=80)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{seed}_{s}_{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
        lengths.append(per_shard)
    (folder / "_info.json").write_text(json.dumps({"classes": classes, "splits": {
        "train": {"filenames": names, "shard_lengths": lengths, "classes": classes},
        "val": {"filenames": names[:1], "shard_lengths": lengths[:1], "classes": classes}}}))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("mixture")
    a = write_source(root / "a", (0, 1), per_shard=24, shards=4, seed=1)
    b = write_source(root / "b", (2, 3), per_shard=16, shards=2, seed=2)  # smaller: wraps around sooner
    return [dict(MIX[0], path=str(a)), dict(MIX[1], path=str(b))]


def test_schedule_holds_each_share_at_every_block_end_and_is_position_addressed():
    schedule = MixtureSchedule([3, 1], seed=7)
    block = schedule.block
    for blocks in (1, 2, 5, 33):
        assert schedule.picks_before(blocks * block).tolist() == [blocks * block * 3 // 4, blocks * block // 4]
    drawn = schedule.sources(0, 10 * block + 37)
    for p in (0, 1, 63, 64, 100, 10 * block + 37):  # counting picks == the O(1) formula, at any position
        assert np.bincount(drawn[:p], minlength=2).tolist() == schedule.picks_before(p).tolist()
    assert schedule.sources(200, 50).tolist() == drawn[200:250].tolist()  # any window, computed alone
    assert MixtureSchedule([3, 1], seed=8).sources(0, 256).tolist() != drawn[:256].tolist()
    huge = MixtureSchedule([1e308, 1e308], seed=0)  # weights that would sum to inf still split evenly
    assert huge.picks_before(128).tolist() == [64, 64]
    rare = MixtureSchedule([999, 1], seed=0)  # a share below one pick per block is still drawn, on time
    for p in (640, 10_000, 99_999, 1_000_000):
        assert abs(rare.picks_before(p)[1] - p / 1000) <= 1, p


@pytest.mark.parametrize("value, message", [
    ("[{weight: 3}]", "data.train[0] has no path"),
    ("[{path: a, weight: 0}]", "data.train[0].weight must be a number > 0, got 0"),
    ("[{path: a, weight: -1, name: x}]", "data.train[0].weight must be a number > 0, got -1"),
    ("[{path: x/a}, {path: y/a}]", "data.train[1] and data.train[0] are both named 'a'"),
    ("[{path: a, wieght: 2}]", "data.train[0]: unknown key 'wieght' (known: path, weight, name)"),
    ("[]", "data.train must be a shard location or a non-empty list"),
    ("[{path: a, name: 'a b'}]", "data.train[0].name must be"),
    ("[{path: 'pipe:cat a.tar'}]", "data.train='pipe:cat a.tar' is not a local path"),
    ("[" + ", ".join(f"p{i}" for i in range(257)) + "]", "data.train lists 257 sources, more than 256"),
])
def test_bad_sources_are_one_line_errors(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.train={value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sources_must_share_their_classes(sources, tmp_path):
    other = write_source(tmp_path / "c", (0,), per_shard=4, shards=1, seed=3, classes=["ant", "bee", "cow", "dog"])
    with pytest.raises(UserError) as err:
        open_train([sources[0], {"path": str(other), "name": "c"}])
    assert str(err.value).startswith("data.train: the classes of source 'c'") and "'a'" in str(err.value)
    assert "at class 2: 'cow' vs 'cat'" in str(err.value) and "\n" not in str(err.value)
    mixed = open_train(sources)  # agreeing sources: one ShardSet over both
    assert mixed.num_samples == 96 + 32 and mixed.classes == CLASSES and len(mixed.mixture) == 2


def _loader(shards, rank, world, state=None, start=0, accumulation=1, workers=2):
    return TrainLoader(shards, seed=11, rank=rank, world_size=world, num_workers=workers, micro_batch_size=4,
                       image_size=32, num_classes=4, shuffle_buffer=8, state=state,
                       mixture_plan=MixturePlan(start, accumulation))


def _draw(loader, batches):
    labels = [next(loader)[1] for _ in range(batches)]
    return [int(x) for t in labels for x in t]


def test_three_to_one_mixture_draws_its_shares_and_resumes_on_another_world_size(sources):
    """Two ranks x 2 loader workers x micro 4 (global 8) for 25 steps, then one rank (accumulation 2, one
    worker) on from the two ranks' saved states: the draws per source follow the weights and the schedule."""
    shards = open_train(sources)
    ranks = [_loader(shards, r, 2) for r in range(2)]
    labels = [x for r in ranks for x in _draw(r, 25)]
    from_a = sum(x < 2 for x in labels) / len(labels)
    assert abs(from_a - 0.75) <= 0.05, from_a  # the labels say where each image came from
    schedule = MixtureSchedule([3, 1], seed=11)
    assert [sum(r.drawn[s] for r in ranks) for s in (0, 1)] == schedule.picks_before(25 * 8).tolist()
    assert sum(x < 2 for x in labels) == schedule.picks_before(25 * 8)[0]
    saved = {str(r): loader.state_dict() for r, loader in enumerate(ranks)}
    # Same layout, resumed on an odd batch count (the other worker's turn): continues bit for bit.
    again = _loader(shards, 1, 2, state=saved["1"], start=25 * 8)
    assert _draw(again, 3) == _draw(ranks[1], 3)
    one = _loader(shards, 0, 1, state=loader_state_for_rank(saved, 0, 1), start=25 * 8, accumulation=2, workers=1)
    more = _draw(one, 2 * 25)
    total = schedule.picks_before(50 * 8)
    assert one.drawn == total.tolist()  # the run's count goes on from the two ranks' draws
    assert sum(x < 2 for x in more) == total[0] - schedule.picks_before(25 * 8)[0]
    positions = one.state_dict()["positions"]["0"]["sources"]
    assert positions["b"]["pass"] >= 1  # the small source wrapped into a fresh pass on its own
    for loader in (*ranks, again, one):
        loader.close()


@pytest.mark.slow
def test_mixture_training_logs_fractions_and_resumes_exactly_on_one_rank(sources, tmp_path):
    """2 ranks under the deepspeed launcher, then the step-4 checkpoint resumed on 1 rank (universal
    checkpoint): the logged fraction per source is within 0.05 of its weight share and identical per step."""
    steps, mix = 8, json.dumps(sources).replace('"', "")
    extra = {"data.train": mix, "data.val": None, "train.steps": steps, "checkpoint.every_steps": 4,
             "data.num_workers": 1}
    source_run = tmp_path / "two"
    res = run(deepspeed_cmd(base_overrides(Path(sources[0]["path"]), source_run, **extra)))
    assert "data mixture of 2 sources" in res.stdout + res.stderr and "a 75.0% of 96 images" in res.stdout + res.stderr
    two = metrics(source_run)[0]
    assert sorted(two) == list(range(1, steps + 1))
    for step, rec in two.items():
        assert abs(rec["data/source_fraction/a"] - 0.75) <= 0.05 and abs(rec["data/source_fraction/b"] - 0.25) <= 0.05
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(source_run / "tb"))
    acc.Reload()
    assert {"data/source_fraction/a", "data/source_fraction/b"} <= set(acc.Tags()["scalars"])

    resumed_run = tmp_path / "one"
    shutil.copytree(source_run, resumed_run)
    shutil.rmtree(resumed_run / "checkpoints" / "step_00000008")
    res = run([sys.executable, "-m", "pipeline.pretrain", *base_overrides(Path(sources[0]["path"]), resumed_run,
                                                                            **extra)])
    assert "at step 4" in res.stdout + res.stderr
    one = metrics(resumed_run)[0]
    assert sorted(one) == list(range(1, steps + 1))
    for step in range(5, steps + 1):
        assert one[step]["data/source_fraction/a"] == two[step]["data/source_fraction/a"]
        assert one[step]["samples_seen"] == two[step]["samples_seen"] and one[step]["lr"] == pytest.approx(
            two[step]["lr"], rel=1e-9)


def test_planner_reads_a_mixture_as_one_split(sources):
    from launch.plan import _dataset

    cfg = load_config(None, ["data.train=" + json.dumps(sources)])
    images, classes, origin = _dataset(cfg, None)
    assert (images, classes) == (96 + 32, 4) and origin.endswith("a/_info.json")
