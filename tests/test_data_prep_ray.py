"""data_prep shard jobs on a real local Ray (one in-process instance shared by this module's tests)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import webdataset as wds
from PIL import Image

from data_prep.cli import main
from data_prep.errors import UserError
from data_prep.shard.job import ShardConfig, run_shard_job
from data_prep.sources.listing import IMG_EXTENSIONS
from tests.test_data_prep_helpers import make_jpeg_tree, make_tricky_tree

pytestmark = pytest.mark.slow


def _info(out: Path) -> dict:
    return json.loads((out / "_info.json").read_text(encoding="utf-8"))


def _rejects(out: Path, split: str = "train") -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {r["source"]: r["reason"] for r in records if r["split"] == split}


def _samples(out: Path, split: str = "train") -> list[dict]:
    urls = [str(out / name) for name in _info(out)["splits"][split]["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_tricky_tree_counts_labels_and_rejects_are_exact(local_ray, tmp_path):
    tree = make_tricky_tree(tmp_path / "src")
    out = tmp_path / "shards"
    result = run_shard_job(ShardConfig(src=tree.root, out=out, shard_size=8, seed=0, max_size=32, dedup=True,
                                       progress=False))
    expected = {k: v for k, v in tree.written.items() if k not in tree.duplicates}
    info = _info(out)
    split = info["splits"]["train"]
    classes = sorted(tree.classes)
    assert info["classes"] == split["classes"] == classes
    assert result.num_samples == split["num_samples"] == len(expected) == sum(split["shard_lengths"])

    # every valid image exactly once, with the right label and metadata; read with stock webdataset
    samples = _samples(out)
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["source"] for m in metas) == sorted(expected)
    for sample, meta in zip(samples, metas):
        source = tree.root / meta["source"]
        assert meta["class"] == expected[meta["source"]]
        assert int(sample["cls"]) == meta["label"] == classes.index(meta["class"])
        assert meta["sha1"] == hashlib.sha1(source.read_bytes()).hexdigest()
        assert (meta["width"], meta["height"]) == Image.open(source).size
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) <= 32
        assert "." not in sample["__key__"]

    # rejects: each skipped file once, with its reason (the corrupt PNG is found only while writing)
    assert _rejects(out) == {**tree.rejected, **{k: "duplicate" for k in tree.duplicates}}
    counts = split["counts"]
    assert counts["duplicates"] == 1 and counts["non_image_files"] == 2 and counts["written"] == len(expected)
    assert counts["per_class"] == {c: sum(1 for v in expected.values() if v == c) for c in classes}
    # full shards except the last, and the one that lost the corrupt PNG in its full decode
    planned = len(expected) + 1
    full = [8] * (planned // 8) + ([planned % 8] if planned % 8 else [])
    shortfall = [p - a for p, a in zip(full, split["shard_lengths"])]
    assert sorted(shortfall) == [0] * (len(full) - 1) + [1]
    for shard in split["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["filename"]).read_bytes()).hexdigest()
    assert set(split["run"]["nodes"]) and split["options"]["dedup"] is True

    # stock Ray Data reads the same samples
    urls = [str(out / name) for name in split["filenames"]]
    rows = local_ray.data.read_webdataset(urls, decoder=None).take_all()
    assert sorted(json.loads(r["json"])["source"] for r in rows) == sorted(expected)
    assert sorted(int(r["cls"]) for r in rows) == sorted(int(s["cls"]) for s in samples)

    # verify passes; the same command again finds everything done
    assert main(["verify", str(out)]) == 0
    again = run_shard_job(ShardConfig(src=tree.root, out=out, shard_size=8, seed=0, max_size=32, dedup=True,
                                      progress=False))
    assert again.up_to_date and again.num_samples == result.num_samples


def test_splits_share_out_and_changed_options_are_refused(local_ray, tmp_path, capsys):
    tree = make_tricky_tree(tmp_path / "src", per_class=3)
    out = tmp_path / "shards"
    base = dict(src=tree.root, out=out, shard_size=5, seed=1, max_size=32, progress=False)
    run_shard_job(ShardConfig(**base))  # no --dedup: the copy is written twice
    run_shard_job(ShardConfig(**{**base, "split": "val", "seed": 2}))
    info = _info(out)
    assert sorted(info["splits"]) == ["train", "val"]
    assert info["splits"]["train"]["num_samples"] == info["splits"]["val"]["num_samples"] == len(tree.written)
    assert _rejects(out, "train") == _rejects(out, "val") == tree.rejected
    train = [json.loads(s["json"])["source"] for s in _samples(out, "train")]
    val = [json.loads(s["json"])["source"] for s in _samples(out, "val")]
    assert sorted(train) == sorted(val) and train != val  # another seed, another global order

    with pytest.raises(UserError, match=r"max_size 32 -> 48.*--overwrite"):
        run_shard_job(ShardConfig(**{**base, "max_size": 48}))
    (tree.root / "cat" / "new.jpg").write_bytes((tree.root / "cat" / "img_000.jpg").read_bytes()[:-1] + b"\xd9")
    with pytest.raises(UserError, match="input files or the class list changed"):
        run_shard_job(ShardConfig(**base))
    result = run_shard_job(ShardConfig(**{**base, "max_size": 48, "overwrite": True}))
    assert result.num_samples == len(tree.written) + 1
    info = _info(out)
    assert info["splits"]["train"]["options"]["max_size"] == 48 and "val" in info["splits"]
    assert max(max(Image.open(io.BytesIO(s["jpg"])).size) for s in _samples(out, "train")) > 32


def _make_tars(tree_root: Path, dest: Path, classes: list[str]) -> None:
    dest.mkdir()
    for name in classes:
        with tarfile.open(dest / f"{name}.tar", "w") as archive:
            for path in sorted((tree_root / name).rglob("*")):
                if path.is_file():
                    archive.add(path, arcname=path.relative_to(tree_root / name).as_posix())


def test_tar_archives_classes_file_and_manifest(local_ray, tmp_path):
    tree = make_tricky_tree(tmp_path / "src", per_class=3)
    tars = tmp_path / "tars"
    _make_tars(tree.root, tars, tree.classes)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("dog\ncat\n", encoding="utf-8")
    out = tmp_path / "from_tars"
    run_shard_job(ShardConfig(src=tars, out=out, shard_size=6, classes_file=classes_file, max_size=32,
                              progress=False))
    split = _info(out)["splits"]["train"]
    assert split["classes"] == ["dog", "cat"] and split["source"]["kind"] == "tars"
    expected = {f"{c}.tar/{k.split('/', 1)[1]}": c for k, c in tree.written.items() if c in ("dog", "cat")}
    metas = [json.loads(s["json"]) for s in _samples(out)]
    assert sorted(m["source"] for m in metas) == sorted(expected)
    assert all(m["label"] == ["dog", "cat"].index(m["class"]) for m in metas)
    rejects = _rejects(out)
    bird = {k: v for k, v in rejects.items() if k.startswith("ünï bird.tar/")}
    image_names = [p for p in (tree.root / "ünï bird").rglob("*") if p.suffix.lower() in IMG_EXTENSIONS]
    assert set(bird.values()) == {"unknown_class"} and len(bird) == len(image_names)
    assert rejects["dog.tar/text.jpg"] == "not_an_image" and rejects["cat.tar/truncated.jpg"] == "truncated"
    # same image bytes -> same shard payload as from the folder, whatever the source kind
    folder_out = tmp_path / "from_folder"
    run_shard_job(ShardConfig(src=tree.root, out=folder_out, shard_size=6, classes_file=classes_file, max_size=32,
                              progress=False))
    by_sha1 = lambda out_dir: {json.loads(s["json"])["sha1"]: s["jpg"] for s in _samples(out_dir)}  # noqa: E731
    assert by_sha1(out) == by_sha1(folder_out)

    manifest = tmp_path / "list.csv"
    rows = ["path,label"] + [f"src/{k},{v}" for k, v in sorted(tree.written.items())] + ["src/missing.jpg,cat"]
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "from_manifest"
    run_shard_job(ShardConfig(src=manifest, out=out, shard_size=6, max_size=32, progress=False))
    metas = [json.loads(s["json"]) for s in _samples(out)]
    assert sorted(m["source"] for m in metas) == sorted(f"src/{k}" for k in tree.written)
    assert _rejects(out) == {"src/missing.jpg": "missing_file"}  # judged when listed, never scanned


def test_verify_reports_damage_and_rerun_repairs_only_that_shard(local_ray, tmp_path, capsys):
    tree = make_tricky_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "shards"
    cfg = ShardConfig(src=tree.root, out=out, shard_size=5, max_size=32, progress=False)
    run_shard_job(cfg)
    good = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    victim = sorted(good)[1]
    damaged = bytearray(good[victim])
    damaged[1000] ^= 0x55
    (out / victim).write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"FAIL train/{victim}: sha256" in report and "1 problem(s)" in report
    result = run_shard_job(cfg)
    assert result.resumed_shards == len(good) - 1 and not result.up_to_date
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == good
    assert main(["verify", str(out)]) == 0


def test_worker_sigkill_mid_shard_is_retried_and_output_unchanged(local_ray, tmp_path):
    """SIGKILL the Ray worker process while it writes a shard: Ray retries the task, the job completes,
    and the shards are the same bytes as an undisturbed run (no duplicate, no loss, no leftover temp)."""
    expected = make_jpeg_tree(tmp_path / "src", classes=2, per_class=60, width=320, height=240)
    cfg = dict(src=tmp_path / "src", shard_size=20, seed=3, max_size=64, workers=1, progress=False)
    killed = []

    def kill_first_writer(stop: threading.Event):
        me = psutil.Process(os.getpid())  # only workers of this test's own Ray (children of its raylet)
        while not stop.is_set() and not killed:
            for proc in me.children(recursive=True):
                try:
                    title = f"{proc.name()} {' '.join(proc.cmdline())}"  # the task: write_planned_shard
                    if "ray::write_planned_shard" in title or "ray::write_shard" in title:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        break
                except psutil.Error:
                    continue
            time.sleep(0.005)

    stop = threading.Event()
    watcher = threading.Thread(target=kill_first_writer, args=(stop,), daemon=True)
    watcher.start()
    try:
        result = run_shard_job(ShardConfig(out=tmp_path / "disturbed", **cfg))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no shard writer was caught running"
    reference = run_shard_job(ShardConfig(out=tmp_path / "reference", **cfg))
    assert result.num_samples == reference.num_samples == len(expected)
    tars = lambda out: {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}  # noqa: E731
    assert tars(tmp_path / "disturbed") == tars(tmp_path / "reference")
    assert not list((tmp_path / "disturbed").glob(".*.tmp"))
    sources = [json.loads(s["json"])["source"] for s in _samples(tmp_path / "disturbed")]
    assert sorted(sources) == sorted(expected)


def test_input_changed_inside_a_task_reaches_the_user_as_one_line(local_ray):
    from data_prep.errors import InputChanged
    from data_prep.shard.job import _run_tasks

    def edited_behind_our_back():
        raise InputChanged("cat/x.jpg changed while the job ran (sha1 differs from the scan)")

    with pytest.raises(UserError) as err:
        _run_tasks(local_ray.remote(edited_behind_our_back), [()], 1, lambda index, result: None)
    assert str(err.value) == "cat/x.jpg changed while the job ran (sha1 differs from the scan)"


def _garbage_entropy_jpeg(data: bytes) -> bytes:
    """The same JPEG with random bytes in the middle of its entropy-coded data: header and end marker
    intact, so only a decode tells it is broken. libjpeg only warns about most garbage (and decodes grey
    blocks); this seed's bytes hold a marker it cannot recover from, checked below by a full decode."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big") + 20
    garbage = bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8))
    assert start + len(garbage) < len(data) - 2
    broken = data[:start] + garbage + data[start + len(garbage):]
    with pytest.raises(OSError):
        Image.open(io.BytesIO(broken)).load()
    return broken


def test_small_jpeg_with_corrupt_data_is_rejected_not_copied(local_ray, tmp_path):
    from data_prep.images import scan

    written = make_jpeg_tree(tmp_path / "src", classes=1, per_class=3, width=64, height=48)
    broken = tmp_path / "src" / "class_0" / "img_0001.jpg"
    data = _garbage_entropy_jpeg(broken.read_bytes())
    broken.write_bytes(data)
    assert data.endswith(b"\xff\xd9") and scan(data, 10**8).reason is None  # only the shard task can tell
    out = tmp_path / "shards"
    # max_size 64 >= the 48 px shorter side: these JPEGs take the keep-the-original-bytes path
    result = run_shard_job(ShardConfig(src=tmp_path / "src", out=out, max_size=64, progress=False))
    assert result.num_samples == 2
    assert _rejects(out)["class_0/img_0001.jpg"] in ("truncated", "unreadable")
    sources = sorted(json.loads(s["json"])["source"] for s in _samples(out))
    assert sources == sorted(k for k in written if k != "class_0/img_0001.jpg")
