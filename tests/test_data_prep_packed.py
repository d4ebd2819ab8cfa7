"""Packed sources: webdataset tars (stock webdataset.TarWriter, our own shards) and parquet files (pyarrow), local
and through fsspec URLs; listing, labels, rejects, reading, and whole shard jobs on Ray."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep.errors import UserError
from data_prep.images import PARQUET_ROW, ImageRejected
from data_prep.sources.read import read_bytes
from data_prep.sources.listing import detect_kind, list_inputs
from tests.conftest import data_prep_error
from tests.test_data_prep_helpers import _rgb, encode


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _webdataset_source(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Two TarWriter shards with webp/png/jpg images and JSON int labels (mapped by labels.json), plus every bad
    member. Returns (sha1 of the image bytes -> class of every sample that must be written, id -> reject reason)."""
    root.mkdir(parents=True)
    (root / "labels.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    expected, rejects = {}, {}
    shards = [[], []]
    for i in range(8):
        fmt, ext = [("WEBP", "webp"), ("PNG", "png"), ("JPEG", "jpg")][i % 3]
        image = _rgb(i, 40 + i, 36).convert("RGBA") if fmt == "PNG" else _rgb(i, 40 + i, 36)
        data = encode(image, fmt)
        shards[i % 2].append({"__key__": f"s{i:03d}", ext: data, "json": _json({"label": i % 2, "url": "x"})})
        expected[_sha1(data)] = ["cat", "dog"][i % 2]
    text = b"this is not an image" * 3
    truncated = encode(_rgb(50).convert("RGBA"), "PNG")[:200]
    shards[0] += [
        {"__key__": "noimage", "json": _json({"label": 0}), "txt": b"caption only"},
        {"__key__": "nolabel", "jpg": encode(_rgb(51), "JPEG"), "json": _json({"url": "x"})},
        {"__key__": "zebra", "jpg": encode(_rgb(52), "JPEG"), "json": _json({"label": 7})},
        {"__key__": "text", "jpg": text, "json": _json({"label": 1})},
        {"__key__": "cut", "png": truncated, "json": _json({"label": 1})},
    ]
    rejects.update({"00000.tar/noimage": "no_image", "00000.tar/nolabel.jpg": "no_label",
                    "00000.tar/zebra.jpg": "unknown_class", "00000.tar/text.jpg": "not_an_image",
                    "00000.tar/cut.png": "truncated"})
    for n, samples in enumerate(shards):
        _write_tar(root / f"{n:05d}.tar", samples)
    return expected, rejects


HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"},
                                     "label": {"names": ["cat", "dog", "eel"], "_type": "ClassLabel"}}}}


def _hf_parquet(path: Path, images: list[bytes | None], labels: list, row_group_size: int = 3) -> None:
    """A Hugging Face image dataset file: image = struct{bytes, path}, label = ClassLabel int (names in metadata)."""
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)], "label": labels})
    table = table.replace_schema_metadata({b"huggingface": json.dumps(HF_FEATURES).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)


def _parquet_source(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    root.mkdir(parents=True)
    expected, rejects = {}, {}
    for n in range(2):
        images, labels = [], []
        for i in range(7):
            data = encode(_rgb(100 + 10 * n + i, 44, 40), "PNG" if i % 2 else "JPEG")
            images.append(data)
            labels.append(i % 3)
            expected[_sha1(data)] = ["cat", "dog", "eel"][i % 3]
        images += [encode(_rgb(200 + n), "JPEG"), None, b"not an image %d" % n]
        labels += [-1, 0, 1]
        rejects.update({f"train-{n:05d}.parquet/{7:09d}": "no_label", f"train-{n:05d}.parquet/{8:09d}": "unreadable",
                        f"train-{n:05d}.parquet/{9:09d}": "not_an_image"})
        _hf_parquet(root / f"train-{n:05d}.parquet", images, labels)
    return expected, rejects


# ---------------------------------------------------------------- listing and reading, no Ray

def test_webdataset_listing_groups_samples_and_reads_members_in_place(tmp_path):
    expected, rejects = _webdataset_source(tmp_path / "wds")
    src = tmp_path / "wds"
    assert detect_kind(src, "auto") == "webdataset"
    listing = list_inputs(src, "auto", None, label_field="label", label_map=src / "labels.json")
    assert listing.kind == "webdataset" and listing.classes == ["cat", "dog"] and not listing.multi_label
    assert {r.id: r.reason for r in listing.rejects} == {k: v for k, v in rejects.items()
                                                         if v in ("no_image", "no_label", "unknown_class")}
    by_sha1 = {}
    for item in listing.inputs:
        data = read_bytes(item.path, item.offset, item.size)  # the member's bytes, read at its offset
        by_sha1[_sha1(data)] = item.class_name
        assert item.id.startswith(("00000.tar/", "00001.tar/")) and item.offset > 0
    assert {k: v for k, v in by_sha1.items() if k in expected} == expected
    assert len(listing.inputs) == len(expected) + 2  # + text.jpg and cut.png: rejected by the scan

    # a JSON list is a multi-label sample; labels the map does not know are dropped and counted
    multi = tmp_path / "multi"
    multi.mkdir()
    _write_tar(multi / "a.tar", [
        {"__key__": "one", "jpg": encode(_rgb(1), "JPEG"), "json": _json({"tags": ["dog", "cat", "dog"]})},
        {"__key__": "two", "jpg": encode(_rgb(2), "JPEG"), "json": _json({"tags": ["bird", "cat"]})},
        {"__key__": "three", "jpg": encode(_rgb(3), "JPEG"), "json": _json({"tags": []})},
    ])
    (multi / "map.csv").write_text("dog,canine\ncat,feline\n")
    listing = list_inputs(multi, "webdataset", None, label_field="tags", label_map=multi / "map.csv")
    assert listing.multi_label and listing.classes == ["canine", "feline"]
    assert {i.id: i.labels for i in listing.inputs} == {"a.tar/one.jpg": ("canine", "feline"),
                                                         "a.tar/two.jpg": ("feline",)}
    assert listing.unknown_labels_dropped == 1
    assert [(r.id, r.reason) for r in listing.rejects] == [("a.tar/three.jpg", "no_label")]


def test_webdataset_label_members_and_integer_labels(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _write_tar(src / "x.tar", [
        {"__key__": "a", "jpg": encode(_rgb(1), "JPEG"), "cls": b"2", "txt": b"tabby"},
        {"__key__": "b", "jpg": encode(_rgb(2), "JPEG"), "cls": b"0", "txt": b"mutt"},
        {"__key__": "c.d", "jpg": encode(_rgb(3), "JPEG"), "cls": b"2", "txt": b"tabby"},  # key "c", ext "d.jpg"
    ])
    listing = list_inputs(src, "auto", None)  # default: the .cls member; integers without names are names
    assert listing.classes == ["0", "2"]
    assert {i.id: i.class_name for i in listing.inputs} == {"x.tar/a.jpg": "2", "x.tar/b.jpg": "0"}
    # webdataset's rule: key "c", extensions "d.jpg", "d.cls": an image, but no `cls` member
    assert [(r.id, r.reason) for r in listing.rejects] == [("x.tar/c.d.jpg", "no_label")]
    assert [i.class_name for i in list_inputs(src, "auto", None, label_field="txt").inputs] == ["tabby", "mutt"]
    (src / "map.json").write_text(json.dumps({"0": "dog", "2": "cat"}))
    assert list_inputs(src, "auto", None, label_map=src / "map.json").classes == ["cat", "dog"]
    with pytest.raises(UserError, match=r"no sample has a label \(--label-field species\).*members seen: cls, "
                                        r"d.cls, d.jpg, d.txt, jpg, txt; json keys seen: none"):
        list_inputs(src, "auto", None, label_field="species")


def test_parquet_listing_reads_rows_by_row_group(tmp_path):
    expected, rejects = _parquet_source(tmp_path / "hf")
    listing = list_inputs(tmp_path / "hf", "auto", None)
    assert listing.kind == "parquet" and listing.classes == ["cat", "dog", "eel"]  # ClassLabel names, in order
    assert {r.id: r.reason for r in listing.rejects} == {k: v for k, v in rejects.items() if v == "no_label"}
    got = {}
    for item in listing.inputs:
        assert item.size == PARQUET_ROW
        try:
            got[_sha1(read_bytes(item.path, item.offset, item.size))] = item.class_name
        except ImageRejected as err:
            assert rejects[item.id] == err.reason == "unreadable"
    assert {k: v for k, v in got.items() if k in expected} == expected and len(got) == len(expected) + 2

    # img2dataset's layout: a `jpg` binary column, `key`, `caption`; a string label column named by --label-field
    flat = tmp_path / "i2d"
    flat.mkdir()
    images = [encode(_rgb(300 + i), "JPEG") for i in range(4)]
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(4)], "caption": ["a"] * 4, "jpg": images,
                             "species": ["cat", None, "dog", "cat"]}), flat / "00000.parquet", row_group_size=100)
    with pytest.raises(UserError, match=r"no label column \(label/labels/cls\); columns: key, caption, jpg"):
        list_inputs(flat, "auto", None)
    listing = list_inputs(flat, "parquet", None, label_field="species")
    assert [(i.id, i.class_name) for i in listing.inputs] == [("00000.parquet/000000000", "cat"),
                                                              ("00000.parquet/000000002", "dog"),
                                                              ("00000.parquet/000000003", "cat")]
    assert read_bytes(listing.inputs[1].path, 2, PARQUET_ROW) == images[2]
    assert [(r.id, r.reason) for r in listing.rejects] == [("00000.parquet/000000001", "no_label")]


def test_auto_detection_keeps_per_class_tars_and_needs_source_when_unsure(tmp_path):
    classes = tmp_path / "per-class"
    classes.mkdir()
    for name in ("cat", "dog"):
        with tarfile.open(classes / f"{name}.tar", "w") as archive:
            for i in range(3):
                data = encode(_rgb(i), "JPEG")
                info = tarfile.TarInfo(f"{name}_{i}.JPEG")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    assert detect_kind(classes, "auto") == "tars"
    assert list_inputs(classes, "auto", None).classes == ["cat", "dog"]
    odd = tmp_path / "odd"
    odd.mkdir()
    with tarfile.open(odd / "a.tar", "w") as archive:  # key "x" twice, no image: neither layout
        for name in ("x.bin", "x.dat"):
            info = tarfile.TarInfo(name)
            archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match="give --source webdataset or --source tars"):
        detect_kind(odd, "auto")
    _write_tar(tmp_path / "single.tar", [{"__key__": "a", "jpg": encode(_rgb(1), "JPEG"), "cls": b"0"}])
    assert detect_kind(tmp_path / "single.tar", "auto") == "webdataset"
    assert len(list_inputs(str(tmp_path / "sing*.tar"), "auto", None).inputs) == 1  # a pattern SRC


def test_fsspec_urls_list_and_read(tmp_path):
    """memory:// (one process) and file:// go through the same fsspec code as s3://."""
    import fsspec

    expected, _rejects = _webdataset_source(tmp_path / "wds")
    fs = fsspec.filesystem("memory")
    for path in sorted((tmp_path / "wds").iterdir()):
        fs.pipe_file(f"/bucket/wds/{path.name}", path.read_bytes())
    _parquet_source(tmp_path / "hf")
    for path in sorted((tmp_path / "hf").iterdir()):
        fs.pipe_file(f"/bucket/hf/{path.name}", path.read_bytes())
    try:
        local = list_inputs(tmp_path / "wds", "auto", None, label_field="label", label_map=tmp_path / "wds/labels.json")
        for src in ("memory://bucket/wds", f"file://{tmp_path}/wds/"):
            remote = list_inputs(src, "auto", None, label_field="label", label_map=tmp_path / "wds/labels.json")
            assert remote.kind == "webdataset" and "://" in remote.inputs[0].path
            assert [(i.id, i.labels, i.class_name) for i in remote.inputs] == \
                [(i.id, i.labels, i.class_name) for i in local.inputs]
            assert {_sha1(read_bytes(i.path, i.offset, i.size)): i.class_name for i in remote.inputs} == \
                {_sha1(read_bytes(i.path, i.offset, i.size)): i.class_name for i in local.inputs}
        remote = list_inputs("memory://bucket/hf/train-*.parquet", "auto", None)
        assert remote.kind == "parquet" and len(remote.inputs) == 18
        first = remote.inputs[0]
        assert first.path == "memory:///bucket/hf/train-00000.parquet"
        assert read_bytes(first.path, first.offset, first.size) == \
            read_bytes(str(tmp_path / "hf/train-00000.parquet"), first.offset, first.size)
        # ImageFolder trees and per-class tars in object storage list like their local copies
        tree = {"cat/a.jpg": encode(_rgb(1), "JPEG"), "cat/sub/b.png": encode(_rgb(2), "PNG"),
                "dog/c.jpg": encode(_rgb(3), "JPEG"), "dog/notes.txt": b"x", "README.md": b"x"}
        for rel, data in tree.items():
            fs.pipe_file(f"/bucket/tree/{rel}", data)
            (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "tree" / rel).write_bytes(data)
        for name in ("cat", "dog"):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                data = tree[f"{name}/{'a' if name == 'cat' else 'c'}.jpg"]
                info = tarfile.TarInfo("a.jpg" if name == "cat" else "c.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            fs.pipe_file(f"/bucket/pc/{name}.tar", buffer.getvalue())
        folder = list_inputs("memory://bucket/tree", "auto", None)
        local = list_inputs(tmp_path / "tree", "auto", None)
        assert folder.kind == "folder" and folder.classes == local.classes == ["cat", "dog"]
        assert [(r.id, r.reason) for r in folder.rejects] == [(r.id, r.reason) for r in local.rejects] == \
            [("README.md", "no_class"), ("dog/notes.txt", "non_image_file")]
        assert {i.id: read_bytes(i.path, i.offset, i.size) for i in folder.inputs} == \
            {k: v for k, v in tree.items() if k.endswith((".jpg", ".png"))}
        archives = list_inputs("memory://bucket/pc", "auto", None)
        assert archives.kind == "tars" and archives.classes == ["cat", "dog"]
        assert {i.id: read_bytes(i.path, i.offset, i.size) for i in archives.inputs} == \
            {"cat.tar/a.jpg": tree["cat/a.jpg"], "dog.tar/c.jpg": tree["dog/c.jpg"]}
        # the job's listing streams both, one class folder or archive at a time, to the same inputs
        from data_prep.spill import PARTITIONS, read_spill
        from data_prep.sources.listing import list_partitioned
        for n, (src, whole) in enumerate((("memory://bucket/tree", folder), ("memory://bucket/pc", archives))):
            parts = list_partitioned(src, "auto", None, 3, tmp_path / f"spill{n}")
            rows = sorted(tuple(r[1:6]) for p in range(PARTITIONS) for r in read_spill(parts.inputs_path(p)))
            assert rows == sorted((i.id, i.class_name, i.path, i.offset, i.size) for i in whole.inputs), src
            assert parts.classes == ["cat", "dog"] and parts.rejected == len(whole.rejects), src
        with pytest.raises(UserError, match="does not exist"):
            list_inputs("memory://bucket/nothing", "webdataset", None)
        with pytest.raises(UserError, match="reads a local path"):
            list_inputs("memory://bucket/wds", "manifest", None)
    finally:
        fs.rm("/bucket", recursive=True)


def test_partitioned_listing_streams_packed_sources_to_the_same_inputs_and_rejects(tmp_path):
    """The job's listing (list_partitioned: rows stream from each tar or parquet file into spill files) finds
    what the in-memory listing finds: the same inputs, labels, classes and rejects, locally and through
    fsspec (memory://, where files are listed on threads as on s3://)."""
    import fsspec

    from data_prep.spill import PARTITIONS, read_spill
    from data_prep.sources.listing import list_partitioned

    listing_reasons = ("no_image", "no_label", "unknown_class")  # the others are found by the scan
    wds_rejects, hf_rejects = (
        sorted((i, r) for i, r in source(tmp_path / name)[1].items() if r in listing_reasons)
        for source, name in ((_webdataset_source, "wds"), (_parquet_source, "hf")))
    fs = fsspec.filesystem("memory")
    for folder in ("wds", "hf"):
        for path in sorted((tmp_path / folder).iterdir()):
            fs.pipe_file(f"/stream/{folder}/{path.name}", path.read_bytes())
    labels = {"label_field": "label", "label_map": tmp_path / "wds/labels.json"}
    cases = [(tmp_path / "wds", labels, wds_rejects), ("memory://stream/wds", labels, wds_rejects),
             (tmp_path / "hf", {}, hf_rejects), ("memory://stream/hf/train-*.parquet", {}, hf_rejects)]
    try:
        for n, (src, kwargs, rejects) in enumerate(cases):
            whole = list_inputs(src, "auto", None, **kwargs)
            parts = list_partitioned(src, "auto", None, 3, tmp_path / f"spill{n}", **kwargs)
            rows = sorted(tuple(r[1:6]) for p in range(PARTITIONS) for r in read_spill(parts.inputs_path(p)))
            assert rows == sorted((i.id, i.class_name, i.path, i.offset, i.size) for i in whole.inputs), src
            assert parts.classes == whole.classes and parts.num_inputs == len(whole.inputs) > 0, src
            lines = parts.rejects_path.read_text(encoding="utf-8").splitlines()
            assert sorted((r["source"], r["reason"]) for r in map(json.loads, lines)) == \
                sorted((r.id, r.reason) for r in whole.rejects) == rejects, src
    finally:
        fs.rm("/stream", recursive=True)


def test_packed_source_mistakes_are_one_line(tmp_path, capsys):
    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    (tree / "cat" / "a.jpg").write_bytes(encode(_rgb(1), "JPEG"))
    out = str(tmp_path / "out")
    assert "--label-field is for webdataset and parquet sources" in data_prep_error(
        capsys, ["shard", str(tree), out, "--label-field", "label"])
    src = tmp_path / "wds"
    src.mkdir()
    _write_tar(src / "a.tar", [{"__key__": "a", "jpg": encode(_rgb(1), "JPEG"), "cls": b"1"}])
    (src / "bad.csv").write_text("1,cat,extra\n")
    assert "bad.csv:1: expected two columns" in data_prep_error(
        capsys, ["shard", str(src), out, "--label-map", str(src / "bad.csv")])
    (src / "bad.json").write_text("[1, 2]")
    assert "expected a JSON object" in data_prep_error(capsys, ["shard", str(src), out, "--label-map",
                                                                str(src / "bad.json")])
    nope = tmp_path / "nope"
    nope.mkdir()
    pq.write_table(pa.table({"label": [1, 2], "url": ["a", "b"]}), nope / "x.parquet")
    assert "no image column" in data_prep_error(capsys, ["shard", str(nope), out])
    (nope / "x.parquet").write_bytes(b"PAR1 garbage")
    assert "cannot be read" in data_prep_error(capsys, ["shard", str(nope), out])


# ---------------------------------------------------------------- whole jobs on Ray

def _info(out: Path) -> dict:
    return json.loads((out / "_info.json").read_text(encoding="utf-8"))


def _rejects(out: Path) -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["source"]: r["reason"] for r in map(json.loads, lines)}


def _samples(out: Path) -> list[dict]:
    urls = [str(out / name) for name in _info(out)["splits"]["train"]["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


@pytest.mark.slow
def test_resharding_our_shards_keeps_every_sample_once_with_its_labels(local_ray, demo_shards, tmp_path):
    from data_prep.shard.job import ShardConfig, run_shard_job

    with pytest.raises(UserError, match="holds the shards of splits train, val"):
        list_inputs(demo_shards, "auto", None)
    old = _samples(demo_shards)
    old_info = _info(demo_shards)["splits"]["train"]
    out = tmp_path / "resharded"
    result = run_shard_job(ShardConfig(src=demo_shards / "train-*.tar", out=out, shard_size=50, max_size=0,
                                       progress=False))
    split = _info(out)["splits"]["train"]
    assert split["source"]["kind"] == "webdataset" and split["classes"] == old_info["classes"]
    assert result.num_samples == old_info["num_samples"] == 160 and split["shard_lengths"] == [50, 50, 50, 10]
    new = _samples(out)
    # the same images (bytes kept: small upright RGB JPEGs), each exactly once, with the same class index
    assert sorted((s["jpg"], s["cls"]) for s in new) == sorted((s["jpg"], s["cls"]) for s in old)
    assert len({s["__key__"] for s in new}) == 160
    assert {json.loads(s["json"])["class"] for s in new} == set(old_info["classes"])
    assert split["counts"]["per_class"] == old_info["counts"]["per_class"]


@pytest.mark.slow
def test_webdataset_and_parquet_sources_shard_correctly(local_ray, tmp_path):
    from data_prep.cli import main
    from data_prep.shard.job import ShardConfig, run_shard_job

    for kind, make, extra in (("webdataset", _webdataset_source, {"label_field": "label"}),
                              ("parquet", _parquet_source, {})):
        src = tmp_path / kind
        expected, rejects = make(src)
        if kind == "webdataset":
            extra["label_map"] = src / "labels.json"
        out = tmp_path / f"out-{kind}"
        result = run_shard_job(ShardConfig(src=src, out=out, shard_size=4, max_size=32, progress=False, **extra))
        split = _info(out)["splits"]["train"]
        assert split["source"]["kind"] == kind and result.num_samples == len(expected)
        assert _rejects(out) == rejects, kind
        classes = split["classes"]
        got = {}
        for sample in _samples(out):
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == meta["label"] == classes.index(meta["class"])
            assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
            got[meta["sha1"]] = meta["class"]
        assert got == expected, kind  # every image once, with its label
        assert main(["verify", str(out)]) == 0

    # Same inputs and seed, read through fsspec (a file:// URL SRC: the code path of s3://, in the Ray workers
    # too): byte-identical shards and the same rejects.
    out = tmp_path / "out-url"
    run_shard_job(ShardConfig(src=f"file://{tmp_path / 'webdataset'}", out=out, shard_size=4, max_size=32,
                              progress=False, label_field="label", label_map=tmp_path / "webdataset/labels.json"))
    assert _info(out)["splits"]["train"]["source"]["path"].startswith("file://")
    local = tmp_path / "out-webdataset"
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {p.name: p.read_bytes() for p in local.glob("*.tar")}
    assert (out / "rejects.jsonl").read_bytes() == (local / "rejects.jsonl").read_bytes()
