"""Issue 22, the data half: hostile inputs end as a sample or a named reject, and the job goes on.

The fast tests call the listing, the reader and the per-image functions in process; the slow ones run real
shard jobs on a local Ray over a tree that holds every hostile case next to valid images.
"""
from __future__ import annotations

import io
import json
import importlib.util
import os
import signal
import stat
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.images import jpeg_ends_at_eoi
from data_prep.images import ImageOptions, ImageRejected, encode, scan
from data_prep.limits import Limits
from data_prep.sources.listing import list_partitioned
from data_prep.sources.read import read_bytes
from data_prep.spill import PARTITIONS, read_spill
from tests.test_data_prep_helpers import _rgb, encode as encode_image

_SPEC = importlib.util.spec_from_file_location("fuzz_sources", Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "fuzz_sources.py")
fuzz_sources = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz_sources)

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that would leave a file behind if anything ran it."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "PWNED"
    bin_dir.mkdir()
    script = bin_dir / "gs"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marker


def _jpeg(seed: int, **kwargs) -> bytes:
    return encode_image(_rgb(seed, 48, 40), "JPEG", quality=90, **kwargs)


def _gps_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "secret description"
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 0.0)  # GPSLatitude
    return _jpeg(seed, exif=exif, comment=b"a comment")


def test_eps_named_jpg_is_rejected_and_gs_never_runs(fake_gs):
    result = scan(EPS, 89_478_485)
    assert result.reason == "not_an_image" and "JPEG" in result.detail
    with pytest.raises(ImageRejected) as err:
        encode(EPS, ImageOptions())
    assert err.value.reason == "not_an_image"
    from pipeline.data.shards import check_jpeg_header, decode_sample

    with pytest.raises(ValueError):
        check_jpeg_header(EPS)
    with pytest.raises(ValueError):
        decode_sample({"__key__": "k", "jpg": EPS, "cls": b"0"})
    assert not fake_gs.exists()


def test_jpeg_passes_through_only_when_it_ends_at_its_eoi_and_strip_metadata_drops_exif():
    clean = _jpeg(1)
    opts = ImageOptions(max_size=256)
    assert encode(clean, opts)[0] == clean  # within size, upright, RGB, nothing appended: its own bytes
    appended = clean + os.urandom(1 << 20)
    out = encode(appended, opts)[0]
    assert out != appended[:len(out)] or len(out) < len(clean) + 1
    assert len(out) < 64 << 10 and jpeg_ends_at_eoi(out)  # re-encoded: the appended MiB is gone
    assert scan(appended, 89_478_485).reason is None  # still a usable image
    gps = _gps_jpeg(2)
    kept = encode(gps, opts)[0]
    assert kept == gps and Image.open(io.BytesIO(kept)).getexif()
    stripped = encode(gps, ImageOptions(max_size=256, strip_metadata=True))[0]
    image = Image.open(io.BytesIO(stripped))
    assert not image.getexif() and "comment" not in image.info and b"secret" not in stripped
    assert image.tobytes() == Image.open(io.BytesIO(gps)).tobytes()  # the pixels' bytes are untouched


def test_reader_reads_regular_files_only_and_never_past_the_byte_limit(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    start = time.monotonic()
    for path, reason in ((fifo, "not_a_file"), (tmp_path / "zero.jpg", "not_a_file"), (big, "too_large")):
        with pytest.raises(ImageRejected) as err:
            read_bytes(path, -1, 0, max_bytes=4096)
        assert err.value.reason == reason, path
    with pytest.raises(ImageRejected) as err:
        read_bytes(big, 0, 5000, max_bytes=4096)  # a tar member: its header's size decides, nothing is read
    assert err.value.reason == "too_large"
    assert time.monotonic() - start < 10  # the FIFO did not wait for a writer
    assert read_bytes(big, -1, 0, max_bytes=5000) == big.read_bytes()


def _listed(parts) -> tuple[list, dict]:
    ids = [row[1] for p in range(PARTITIONS) for row in read_spill(parts.inputs_path(p))]
    rejects = {r["source"]: (r["reason"], r["detail"]) for r in read_spill(parts.rejects_path)}
    assert len(rejects) == parts.rejected  # one line per reject, no source twice
    return ids, rejects


def test_hostile_manifest_rows_are_rejects_and_the_listing_goes_on(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        (images / f"ok{i}.jpg").write_bytes(_jpeg(i))
    lines = [
        '{"path": "img/ok0.jpg", "label": "cat"}',
        '{"path": "img/n1.jpg", "label": %s}' % ("[" * 100_000 + "]" * 100_000),  # RecursionError in json
        '{"path": "img/n2.jpg", "label": %s}' % ("[" * 1000 + "]" * 1000),        # short, but too deep
        '{"path": "img/n3.jpg", "label": {"name": "cat"}}',                    # an object label
        '{"path": "img/a\\u0000b.jpg", "label": "cat"}',                     # a NUL in the path
        '{"path": "img/n5.jpg", "labels": ' + json.dumps(["c"] * 5000) + '}',  # too many labels
        '{"path": "img/n6.jpg", "label": "' + "x" * 70_000 + '"}',             # a label over the limit
        "not json at all",
        '{"path": "img/ok2.jpg", "label": "dog"}',
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\n".join(lines).encode() + b'\n{"path": "img/\xff\xfe.jpg", "label": "cat"}\n')
    parts = list_partitioned(manifest, "auto", None, 0, tmp_path / "spill", limits=Limits(max_labels=100))
    ids, rejects = _listed(parts)
    assert sorted(ids) == ["img/ok0.jpg", "img/ok2.jpg"]
    assert {k: v[0] for k, v in rejects.items()} == {
        "m.jsonl:2": "label_too_large", "m.jsonl:3": "bad_label", "img/n3.jpg": "bad_label",
        "m.jsonl:5": "bad_name", "img/n5.jpg": "too_many_labels", "m.jsonl:7": "label_too_large",
        "m.jsonl:8": "bad_label", "m.jsonl:10": "bad_name"}, rejects
    assert "nested 1001 deep" in rejects["m.jsonl:3"][1] and "not a class name" in rejects["img/n3.jpg"][1]
    assert parts.classes == ["cat", "dog"]


def test_hostile_tree_listing_never_loops_and_reads_no_special_file(tmp_path):
    root = tmp_path / "src"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "a.jpg").write_bytes(_jpeg(1))
    (root / "cat" / "sub" / "b.jpg").write_bytes(_jpeg(2))
    (root / "dog" / "c.jpg").write_bytes(_jpeg(3))
    (root / "cat" / "loop").symlink_to("..")            # back to SRC: every class again, forever
    (root / "cat" / "sub" / "up").symlink_to("..")      # back to cat
    (root / "dog" / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "dog" / "fifo.jpg")
    with open(os.fsencode(root / "dog") + b"/bad\xff.jpg", "wb") as handle:
        handle.write(_jpeg(4))
    parts = list_partitioned(root, "auto", None, 0, tmp_path / "spill")
    ids, rejects = _listed(parts)
    assert sorted(ids) == ["cat/a.jpg", "cat/sub/b.jpg", "dog/c.jpg"]
    assert {k: v[0] for k, v in rejects.items()} == {
        "cat/loop": "repeated_folder", "cat/sub/up": "repeated_folder", "dog/zero.jpg": "not_a_file",
        "dog/fifo.jpg": "not_a_file", "dog/bad\\xff.jpg": "bad_name"}


def _tar(path: Path, members: dict[str, bytes], gzip: bool = False) -> None:
    with tarfile.open(path, "w:gz" if gzip else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_webdataset_deep_and_oversized_label_members_are_rejects(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    deep = b"[" * 50_000 + b"]" * 50_000
    _tar(src / "a.tar", {"s0.jpg": _jpeg(0), "s0.cls": b"1", "s1.jpg": _jpeg(1), "s1.json": b'{"label": ' + deep + b"}",
                         "s2.jpg": _jpeg(2), "s2.json": b'{"label": "' + b"y" * 70_000 + b'"}',
                         "s3.jpg": _jpeg(3), "s3.json": b'{"label": {"a": 1}}', "s4.jpg": _jpeg(4),
                         "s4.json": b'{"label": "dog"}', "s5.jpg": _jpeg(5),
                         "s5.json": b'{"label": ' + b"[" * 1000 + b"]" * 1000 + b"}"})
    parts = list_partitioned(src, "webdataset", None, 0, tmp_path / "spill", label_field="label")
    ids, rejects = _listed(parts)
    assert ids == ["a.tar/s4.jpg"]
    assert {k: v[0] for k, v in rejects.items()} == {
        "a.tar/s0.jpg": "no_label", "a.tar/s1.jpg": "label_too_large", "a.tar/s2.jpg": "label_too_large",
        "a.tar/s3.jpg": "no_label", "a.tar/s5.jpg": "no_label"}


def test_training_skips_oversized_members_and_never_decompresses_a_shard(tmp_path):
    from webdataset.tariterators import group_by_keys, url_opener

    from pipeline.data.shards import tar_members

    plain, packed = tmp_path / "train-000000.tar", tmp_path / "train-000001.tar"
    _tar(plain, {"a.jpg": _jpeg(0), "a.cls": b"0", "b.jpg": b"\xff" * 9000, "b.cls": b"1"})
    _tar(packed, {"c.jpg": _jpeg(1), "c.cls": b"0"}, gzip=True)  # a gzip stream named .tar
    errors = []

    def handler(exn):
        errors.append(str(exn))
        return True

    opened = url_opener(iter([{"url": str(plain)}, {"url": str(packed)}]), handler=handler)
    samples = list(group_by_keys(tar_members(opened, handler, max_bytes=8192), handler=handler))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == \
        [("a", ["cls", "jpg"]), ("b", ["cls"])]
    assert len(errors) == 2 and "b.jpg" in errors[0] and "8,192" in errors[0], errors


def test_fuzz_every_source_kind_small_seeded_run():
    """benchmarks/fuzz_sources.py, a few cases per kind: no crash, hang or nondeterminism (the long run is the
    benchmark's; its figures are in docs/benchmarks.md)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "fuzz_sources.py"), "--cases", "6", "--seed",
                          "1000", "--timeout", "60"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    total = res.stdout.strip().splitlines()[-1]
    assert total.startswith("total: 42 cases, 0 crashes, 0 hangs, 0 nondeterministic"), res.stdout
    assert res.stdout.count("sample") >= 7  # every kind produced samples, not only rejects


@pytest.mark.slow
def test_hostile_tree_job_completes_with_every_valid_image_once(local_ray, tmp_path, fake_gs):
    from data_prep.shard.job import ShardConfig, run_shard_job

    root = tmp_path / "src"
    valid = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            name = f"{cls}/v{i}.jpg"
            (root / name).write_bytes(_jpeg(len(valid)))
            valid[name] = cls
    appended = _jpeg(99) + b"\x00APPENDED" * 100_000
    (root / "cat" / "appended.jpg").write_bytes(appended)
    valid["cat/appended.jpg"] = "cat"
    (root / "dog" / "gps.jpg").write_bytes(_gps_jpeg(98))
    valid["dog/gps.jpg"] = "dog"
    (root / "cat" / "eps.jpg").write_bytes(EPS)
    (root / "cat" / "big.jpg").write_bytes(_jpeg(7) + b"\x00" * 3_000_000)
    (root / "cat" / "loop").symlink_to("..")
    (root / "dog" / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "dog" / "fifo.jpg")
    with open(os.fsencode(root / "dog") + b"/bad\xff.jpg", "wb") as handle:
        handle.write(_jpeg(5))
    out = tmp_path / "out"
    start = time.monotonic()
    run_shard_job(ShardConfig(src=root, out=out, shard_size=4, max_size=64, max_bytes=2_000_000, strip_metadata=True,
                              progress=False))
    assert time.monotonic() - start < 240
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    samples = list(wds.WebDataset([str(out / n) for n in info["filenames"]], shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["source"] for m in metas) == sorted(valid)  # each valid image exactly once
    rejects = {json.loads(line)["source"]: json.loads(line)["reason"]
               for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert rejects == {"cat/eps.jpg": "not_an_image", "cat/big.jpg": "too_large", "cat/loop": "repeated_folder",
                       "dog/zero.jpg": "not_a_file", "dog/fifo.jpg": "not_a_file", "dog/bad\\xff.jpg": "bad_name"}
    jpg = next(s["jpg"] for s, m in zip(samples, metas) if m["source"] == "cat/appended.jpg")
    assert b"APPENDED" not in jpg and jpeg_ends_at_eoi(jpg)  # re-encoded, not copied
    gps = next(s["jpg"] for s, m in zip(samples, metas) if m["source"] == "dog/gps.jpg")
    assert b"secret" not in gps and not Image.open(io.BytesIO(gps)).getexif()  # --strip-metadata
    assert not fake_gs.exists()
    assert stat.S_ISREG(os.stat(root / "cat" / "appended.jpg").st_mode)


def test_mostly_broken_shards_stop_training_with_one_line(tmp_path):
    from core.errors import UserError
    from pipeline.data.loader import TrainLoader
    from pipeline.data.shards import ShardSet

    urls = []
    for shard in range(2):
        members = []
        for i in range(32):
            good = i % 5 == 0  # 1 in 5 decodes; the others are not images or over data.max_sample_bytes
            data = _jpeg(i) if good else (b"\xff" * 5000 if i % 2 else b"not a jpeg")
            members += [(f"s{shard}-{i:02d}.jpg", data), (f"s{shard}-{i:02d}.cls", b"0")]
        urls.append(str(tmp_path / f"train-{shard:06d}.tar"))
        with tarfile.open(urls[-1], "w") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    shards = ShardSet(urls, [32, 32], 64, ["a"])
    loader = TrainLoader(shards, seed=0, rank=0, world_size=1, num_workers=0, micro_batch_size=4, image_size=32,
                         num_classes=1, shuffle_buffer=0, max_sample_bytes=4096, max_corrupt_fraction=0.5)
    with pytest.raises(UserError, match=r"skipped as corrupt or over the limits \(\d+% > data.max_corrupt_fraction"):
        for _ in range(20):
            next(loader)
    lenient = TrainLoader(shards, seed=0, rank=0, world_size=1, num_workers=0, micro_batch_size=4, image_size=32,
                          num_classes=1, shuffle_buffer=0, max_sample_bytes=4096, max_corrupt_fraction=0.9)
    assert all(next(lenient)[0].shape == (4, 3, 32, 32) for _ in range(5))
    assert lenient.corrupt_count >= 16
    # A resume (here on another layout, which puts the run's whole count on worker 0) keeps the run's total for
    # the logs but judges the fraction on this launch's reading: a long run's skipped samples never stop it.
    resumed = TrainLoader(shards, seed=0, rank=0, world_size=1, num_workers=0, micro_batch_size=2, image_size=32,
                          num_classes=1, shuffle_buffer=0, max_sample_bytes=4096, max_corrupt_fraction=0.5,
                          state=lenient.state_dict())
    assert resumed.corrupt_count == lenient.corrupt_count and resumed.read_since_launch() == (0, 0)


@pytest.mark.slow
def test_hostile_manifest_job_completes_with_every_valid_image_once(local_ray, tmp_path):
    from data_prep.shard.job import ShardConfig, run_shard_job

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"ok{i}.jpg").write_bytes(_jpeg(i))
        rows.append(json.dumps({"path": f"img/ok{i}.jpg", "label": ["cat", "dog"][i % 2]}))
    rows += ['{"path": "img/ok0.jpg", "label": ' + "[" * 100_000 + "]" * 100_000 + "}",  # deep JSON
             '{"path": "img/x1.jpg", "label": {"class": "cat"}}',                      # an object label
             '{"path": "img/a\\u0000.jpg", "label": "cat"}']                           # a NUL in the path
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run_shard_job(ShardConfig(src=manifest, out=out, shard_size=3, max_size=64, progress=False))
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    samples = list(wds.WebDataset([str(out / n) for n in info["filenames"]], shardshuffle=False))
    assert sorted(json.loads(s["json"])["source"] for s in samples) == [f"img/ok{i}.jpg" for i in range(4)]
    rejects = {json.loads(line)["source"]: json.loads(line)["reason"]
               for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert rejects == {"m.jsonl:5": "label_too_large", "img/x1.jpg": "bad_label", "m.jsonl:7": "bad_name"}


def test_a_damaged_archive_or_parquet_file_is_a_reject_and_the_others_are_listed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "wds"
    src.mkdir()
    _tar(src / "a.tar", {f"k{i}.{ext}": (_jpeg(i) if ext == "jpg" else b"1")
                         for i in range(4) for ext in ("jpg", "cls")})
    _tar(src / "b.tar", {"z.jpg": _jpeg(9), "z.cls": b"2"})
    with tarfile.open(src / "a.tar") as archive:
        at = archive.getmember("k2.jpg").offset  # the header of the third sample's image
    data = (src / "a.tar").read_bytes()
    (src / "a.tar").write_bytes(data[:at] + b"\x07" * 512 + data[at + 512:])
    ids, rejects = _listed(list_partitioned(src, "webdataset", None, 0, tmp_path / "s1"))
    assert sorted(ids) == ["a.tar/k0.jpg", "a.tar/k1.jpg", "b.tar/z.jpg"] and rejects["a.tar"][0] == "damaged_file"
    tars = tmp_path / "tars"
    tars.mkdir()
    _tar(tars / "cat.tar", {"x.jpg": _jpeg(1)})
    (tars / "dog.tar").write_bytes(b"not a tar at all" * 100)
    ids, rejects = _listed(list_partitioned(tars, "tars", None, 0, tmp_path / "s2"))
    assert ids == ["cat.tar/x.jpg"] and rejects == {"dog.tar": ("damaged_file", rejects["dog.tar"][1])}
    parquet = tmp_path / "pq"
    parquet.mkdir()
    pq.write_table(pa.table({"jpg": [_jpeg(1)], "label": ["cat"]}), parquet / "a.parquet")
    (parquet / "b.parquet").write_bytes(b"PAR1 garbage")
    ids, rejects = _listed(list_partitioned(parquet, "parquet", None, 0, tmp_path / "s3"))
    assert ids == ["a.parquet/000000000"] and rejects["b.parquet"][0] == "damaged_file"


@given(kind=st.sampled_from(fuzz_sources.KINDS), seed=st.integers(min_value=0, max_value=2**31 - 1))
@settings(max_examples=21, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_cases_drawn_by_hypothesis_end_as_samples_or_named_rejects(kind, seed, tmp_path):
    """Hypothesis draws (source kind, seed) and shrinks a failure to its smallest seed; each case builds a valid
    source, mutates it (benchmarks/fuzz_sources.py) and runs the listing, read, scan and encode twice.
    derandomize: CI tries the same cases every run; a failure prints the (kind, seed) to replay with
    `python benchmarks/fuzz_sources.py --kinds KIND --seed SEED --cases 1`."""
    signal.signal(signal.SIGALRM, _raise_hang)
    status, counts = fuzz_sources.fuzz(kind, seed, tmp_path, timeout_s=60)
    assert status == "ok", f"{status}: python benchmarks/fuzz_sources.py --kinds {kind} --seed {seed} --cases 1"
    assert sum(counts.values()) >= 1  # every case ends somewhere: samples, named rejects or a source error


def _raise_hang(_signum, _frame):
    raise fuzz_sources.Hang()
