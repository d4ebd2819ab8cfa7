"""data_prep without Ray: demo data, per-image handling, listing, planning, shard writing, CLI errors."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchvision.datasets.folder import find_classes

from core.files import stale_temps
from data_prep.cli import main
from data_prep.demo_data import DemoDataConfig, generate
from data_prep.errors import InputChanged, UserError
from data_prep.images import ImageOptions, ImageRejected, encode, scan, target_size
from data_prep.shard.plan import sample_key, shuffle_ids
from data_prep.sources.listing import list_inputs
from data_prep.shard.tasks import valid_receipt, write_shard
from tests.conftest import data_prep_error, free_port
from tests.test_data_prep_helpers import (
    corrupt_pixels_png, decompression_bomb_png, encode as encode_image, exif_rotated_jpeg, make_tricky_tree, _rgb,
)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- demo data

def test_demo_data_is_deterministic_and_has_two_label_sets(tmp_path):
    cfg = DemoDataConfig(out=tmp_path / "a", classes=4, per_class=5, size=48, seed=3, label_set="shapes")
    assert generate(cfg) == {"circle": 5, "square": 5, "triangle": 5, "star": 5}
    generate(DemoDataConfig(**{**cfg.__dict__, "out": tmp_path / "b"}))
    generate(DemoDataConfig(**{**cfg.__dict__, "out": tmp_path / "c", "seed": 4}))
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b, "same arguments must give byte-identical files"
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a), "another seed gives other images"
    image = Image.open(tmp_path / "a" / "circle" / "circle_00000.jpg")
    assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"

    counts = generate(DemoDataConfig(out=tmp_path / "fine", classes=4, per_class=6, size=48, seed=3,
                                     label_set="shape-color"))
    assert sorted(counts) == ["circle-green", "circle-red", "square-green", "square-red"]
    assert sorted(p.name for p in (tmp_path / "fine").iterdir()) == sorted(counts)


def test_demo_colour_carries_the_shape_color_label(tmp_path):
    """In 'shape-color' the colour is part of the label: red classes have strongly red pixels, green ones not."""
    generate(DemoDataConfig(out=tmp_path, classes=4, per_class=8, size=64, seed=0, label_set="shape-color"))

    def red_pixels(folder: str) -> float:
        counts = []
        for path in sorted((tmp_path / folder).iterdir()):
            rgb = np.asarray(Image.open(path), dtype=np.int32)
            counts.append(np.sum((rgb[..., 0] > 170) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)))
        return float(np.mean(counts))

    assert red_pixels("circle-red") > 100 and red_pixels("square-red") > 100
    assert red_pixels("circle-green") < 5 and red_pixels("square-green") < 5


def test_demo_data_cli_is_fast_and_refuses_bad_input(tmp_path, capsys):
    import time

    start = time.perf_counter()
    assert main(["demo-data", str(tmp_path / "d"), "--classes", "6", "--per-class", "50", "--size", "64"]) == 0
    assert time.perf_counter() - start < 10  # a few hundred 64 px images in about a second
    assert sum(1 for _ in (tmp_path / "d").rglob("*.jpg")) == 300
    capsys.readouterr()
    assert main(["demo-data", str(tmp_path / "d")]) == 2  # not empty
    assert main(["demo-data", str(tmp_path / "e"), "--classes", "9"]) == 2  # shapes has 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--overwrite" in err[0] and "1..8" in err[1]


# ---------------------------------------------------------------- per image

OPTS = ImageOptions(max_size=32, max_aspect=4.0, quality=90)


def test_scan_reasons_for_broken_files():
    good = encode_image(_rgb(1, 64, 48), "JPEG")
    rgba_png = encode_image(_rgb(2).convert("RGBA"), "PNG")
    assert scan(good, 10**8).reason is None
    assert scan(good, 10**8).sha1 == hashlib.sha1(good).hexdigest()
    assert scan(good + b"trailing junk after the end marker", 10**8).reason is None
    assert scan(b"", 10**8).reason == "unreadable"
    assert scan(good[: len(good) // 2], 10**8).reason == "truncated"
    assert scan(rgba_png[:200], 10**8).reason == "truncated"
    assert scan(b"plain text", 10**8).reason == "not_an_image"
    assert scan(decompression_bomb_png(), 10**8).reason == "too_many_pixels"
    assert scan(good, 64 * 48 - 1).reason == "too_many_pixels"  # the --max-pixels guard itself


def test_encode_converts_every_mode_and_resizes():
    def run(data: bytes) -> Image.Image:
        jpg, _w, _h = encode(data, OPTS)
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG" and image.mode == "RGB"
        return image

    for mode in ("CMYK", "L", "P", "RGBA", "LA", "1"):
        fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
        assert run(encode_image(_rgb(3, 64, 48).convert(mode), fmt)).size == (43, 32)
    # 16-bit grey is scaled to 8 bits, not clipped to white
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    grey = np.asarray(run(encode_image(Image.fromarray(ramp), "PNG")))[..., 0]
    assert 100 < grey.mean() < 155 and grey.min() < 20
    # transparent pixels become white
    clear = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert np.asarray(run(encode_image(clear, "PNG"))).min() > 240
    # EXIF orientation is applied: 60x30 stored, displayed as 30x60
    assert run(exif_rotated_jpeg(4)).size == (30, 60)
    invalid = Image.Exif()
    invalid[0x0112] = 9  # out of range: treated as upright, never a distorted resize
    assert run(encode_image(_rgb(6, 64, 48), "JPEG", exif=invalid.tobytes())).size == (43, 32)


def test_encode_keeps_small_jpegs_and_never_upscales():
    small = encode_image(_rgb(5, 30, 20), "JPEG")
    assert encode(small, OPTS)[0] == small  # within size, upright, RGB: original bytes
    assert target_size(30, 20, OPTS) == (30, 20)
    assert target_size(500, 375, ImageOptions(max_size=256)) == (341, 256)
    assert target_size(4000, 100, ImageOptions(max_size=256, max_aspect=4.0)) == (1024, 26)  # panorama capped
    assert target_size(500, 375, ImageOptions(max_size=0)) == (500, 375)
    with pytest.raises(ImageRejected) as err:
        encode(b"GIF89a-but-broken", OPTS)
    assert err.value.reason in ("not_an_image", "truncated", "unreadable")


# ---------------------------------------------------------------- listing

def test_folder_listing_matches_torchvision_and_rejects_by_name(tmp_path):
    tree = make_tricky_tree(tmp_path / "src")
    listing = list_inputs(tree.root, "auto", None)
    assert listing.kind == "folder"
    assert listing.classes == find_classes(str(tree.root))[0] == sorted(tree.classes)
    ids = [i.id for i in listing.inputs]
    assert ids == sorted(ids)
    by_name = {r.id: r.reason for r in listing.rejects}
    assert by_name == {k: v for k, v in tree.rejected.items() if v in ("non_image_file", "no_class")}
    expected = set(tree.written) | {k for k, v in tree.rejected.items() if v not in ("non_image_file", "no_class")}
    assert set(ids) == expected | set(tree.duplicates)
    assert "dog/nested/deeper/inner.webp" in ids and "cat/UPPER CASE.JPG" in ids


def test_tar_and_manifest_listings(tmp_path):
    tree = make_tricky_tree(tmp_path / "src", per_class=2)
    tars = tmp_path / "tars"
    tars.mkdir()
    for name in tree.classes:
        with tarfile.open(tars / f"{name}.tar", "w") as archive:
            for path in sorted((tree.root / name).rglob("*")):
                if path.is_file():
                    archive.add(path, arcname=path.relative_to(tree.root / name).as_posix())
    listing = list_inputs(tars, "auto", None)
    assert listing.kind == "tars" and listing.classes == sorted(tree.classes)
    member = next(i for i in listing.inputs if i.id == "cat.tar/with space.jpg")
    with open(member.path, "rb") as handle:
        handle.seek(member.offset)
        assert handle.read(member.size) == (tree.root / "cat" / "with space.jpg").read_bytes()

    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": f"src/{rel}", "label": i % 2 * 10 + 2})
                                  for i, rel in enumerate(sorted(tree.written))) + "\n", encoding="utf-8")
    listing = list_inputs(manifest, "auto", None)
    assert listing.kind == "manifest" and listing.classes == ["2", "12"]  # integer labels sort as numbers
    assert {i.id for i in listing.inputs} == {f"src/{rel}" for rel in tree.written}
    csv_manifest = tmp_path / "list.csv"
    csv_manifest.write_text("path,label\nsrc/cat/img_000.jpg,cat\nsrc/missing.jpg,dog\n", encoding="utf-8")
    listing = list_inputs(csv_manifest, "auto", None)
    assert [(i.id, i.class_name, i.size) for i in listing.inputs] == [
        ("src/cat/img_000.jpg", "cat", (tree.root / "cat/img_000.jpg").stat().st_size)]
    assert [(r.id, r.class_name, r.reason) for r in listing.rejects] == [("src/missing.jpg", "dog", "missing_file")]


def test_classes_file_fixes_order_and_rejects_other_classes(tmp_path):
    tree = make_tricky_tree(tmp_path / "src", per_class=2)
    classes = tmp_path / "classes.txt"
    classes.write_text("# ImageNet-style class list\ndog\ncat\nzebra\n", encoding="utf-8")
    listing = list_inputs(tree.root, "folder", classes)
    assert listing.classes == ["dog", "cat", "zebra"]
    unknown = {r.id for r in listing.rejects if r.reason == "unknown_class"}
    assert unknown == {p.relative_to(tree.root).as_posix() for p in (tree.root / "ünï bird").rglob("*")
                       if p.suffix.lower() in (".jpg", ".png")}
    # another split's _info.json (or any {"classes": [...]} / JSON list) works as a class file too
    info = tmp_path / "_info.json"
    info.write_text(json.dumps({"splits": {}, "classes": ["cat", "dog"]}), encoding="utf-8")
    assert list_inputs(tree.root, "folder", info).classes == ["cat", "dog"]
    info.write_text(json.dumps({"classes": "cat"}), encoding="utf-8")
    with pytest.raises(UserError, match="JSON list of class names"):
        list_inputs(tree.root, "folder", info)


# ---------------------------------------------------------------- plan and shard writing

def test_shuffle_depends_only_on_ids_and_seed():
    ids = [f"c/{i:03d}.jpg" for i in range(200)]
    order = shuffle_ids(ids, 0)
    assert order == shuffle_ids(list(reversed(ids)), 0) and order != ids
    assert shuffle_ids(ids, 1) != order
    fewer = shuffle_ids(ids[1:], 0)
    assert fewer == [i for i in order if i != ids[0]]  # removing a file moves no other file
    keys = {sample_key(i) for i in ids + ["a/x.y.z.jpg", "a/x_y.z.jpg", "a/ünï code.jpg"]}
    assert len(keys) == 203 and not any("." in k or "/" in k for k in keys)


def _rows(tmp_path: Path, count: int) -> list[list]:
    rows = []
    for i in range(count):
        path = tmp_path / f"in_{i}.jpg"
        data = encode_image(_rgb(i, 80, 60), "JPEG")
        path.write_bytes(data)
        rows.append([sample_key(path.name), path.name, str(path), -1, len(data), i % 3, f"class_{i % 3}",
                     hashlib.sha1(data).hexdigest(), 80, 60])
    return rows


def test_write_shard_is_byte_identical_atomic_and_resumable(tmp_path):
    rows = _rows(tmp_path, 7)
    options = {"max_size": 32, "max_aspect": 4.0, "quality": 90, "max_pixels": 10**8}
    digest = "plan-hash"
    outs = [tmp_path / "out1", tmp_path / "out2"]
    receipts = []
    for out in outs:
        out.mkdir()
        receipts.append(write_shard(str(out), "train", "train-000000.tar", digest, rows, options))
    first, second = ((o / "train-000000.tar").read_bytes() for o in outs)
    assert first == second and receipts[0]["sha256"] == hashlib.sha256(first).hexdigest()
    assert receipts[0]["num_samples"] == 7 and receipts[0]["bytes"] == len(first)
    assert not stale_temps(outs[0])

    samples = list(wds.WebDataset(str(outs[0] / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r[0] for r in rows]
    assert [int(s["cls"]) for s in samples] == [r[5] for r in rows]
    meta = json.loads(samples[0]["json"])
    assert meta == {"source": "in_0.jpg", "class": "class_0", "label": 0, "width": 80, "height": 60,
                    "sha1": rows[0][7]}
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (43, 32)
    with tarfile.open(outs[0] / "train-000000.tar") as archive:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in archive} == {(0, 0, 0, "data_prep", 0o444)}

    again = write_shard(str(outs[0]), "train", "train-000000.tar", digest, rows, options)
    assert again["resumed"] and again["sha256"] == receipts[0]["sha256"]
    assert valid_receipt(outs[0], "train", "train-000000.tar", "another plan") is None
    damaged = bytearray(first)
    damaged[700] ^= 0xFF
    (outs[0] / "train-000000.tar").write_bytes(bytes(damaged))
    assert valid_receipt(outs[0], "train", "train-000000.tar", digest) is None
    redone = write_shard(str(outs[0]), "train", "train-000000.tar", digest, rows, options)
    assert not redone["resumed"] and (outs[0] / "train-000000.tar").read_bytes() == first


def test_spill_folders_of_killed_jobs_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """A job killed by SIGKILL cannot remove its listing spill (hundreds of GB at a billion rows): the next
    job on the host removes the folders whose owner is gone (its lock on the record is free), and only those:
    a killed job's is removed; a running job's (lock held, here by another process), another host's and one
    without a record are kept."""
    import fcntl
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    from core.files import owned_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    for name, owner_host in (("killed", host), ("running", host), ("elsewhere", "another-host")):
        folder = tmp_path / f"data_prep-list-{name}"
        folder.mkdir()
        (folder / "owner.json").write_text(json.dumps({"host": owner_host, "pid": 1}))
        (folder / "inputs-000.jsonl").write_text("[]\n")
    (tmp_path / "data_prep-list-unrecorded").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "data_prep-list-running/owner.json")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        removed = []
        with owned_temp_dir("data_prep-list-", on_removed=removed.append) as spill:
            assert json.loads((spill / "owner.json").read_text()) == {"host": host, "pid": os.getpid()}
            assert removed == [tmp_path / "data_prep-list-killed"]
            assert {p.name for p in tmp_path.iterdir()} == {"data_prep-list-running", "data_prep-list-elsewhere",
                                                             "data_prep-list-unrecorded", spill.name}
            with open(spill / "owner.json", "rb") as record:  # our own spill is locked while in use
                with pytest.raises(OSError):
                    fcntl.flock(record, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not spill.exists()
    finally:
        holder.kill()
        holder.wait()


def test_write_shard_drops_files_that_fail_the_full_decode(tmp_path):
    rows = _rows(tmp_path, 3)
    bad = tmp_path / "in_1.jpg"
    bad.write_bytes(b"")  # other content than the scan saw: the job must stop, not write a different shard
    with pytest.raises(InputChanged, match="changed while the job ran"):
        write_shard(str(tmp_path), "train", "train-000000.tar", "h", rows, {"max_size": 32})
    assert not list(tmp_path.glob("*.tar")) and not stale_temps(tmp_path)
    bad.unlink()
    with pytest.raises(InputChanged, match="cannot be read any more"):
        write_shard(str(tmp_path), "train", "train-000000.tar", "h", rows, {"max_size": 32})
    rows = _rows(tmp_path, 3)
    broken_path = tmp_path / "broken.png"
    data = corrupt_pixels_png(9)
    broken_path.write_bytes(data)
    assert scan(data, 10**8).reason is None
    rows.insert(1, [sample_key("broken.png"), "broken.png", str(broken_path), -1, len(data), 0, "class_0",
                    hashlib.sha1(data).hexdigest(), 40, 40])
    receipt = write_shard(str(tmp_path), "train", "train-000000.tar", "h2", rows, {"max_size": 32})
    assert receipt["num_samples"] == 3
    assert [(r["source"], r["reason"]) for r in receipt["rejects"]] == [("broken.png", "unreadable")]


# ---------------------------------------------------------------- CLI errors: one line, exit 2, no Ray needed

def test_user_errors_are_one_line(tmp_path, capsys):
    tree = make_tricky_tree(tmp_path / "src", per_class=1)
    out = str(tmp_path / "out")
    assert "does not exist" in data_prep_error(capsys, ["shard", str(tmp_path / "nope"), out])
    (tmp_path / "empty").mkdir()
    assert "no class folders" in data_prep_error(capsys, ["shard", str(tmp_path / "empty"), out])
    (tmp_path / "only_text" / "a").mkdir(parents=True)
    (tmp_path / "only_text" / "a" / "x.txt").write_text("x")
    assert "no image files" in data_prep_error(capsys, ["shard", str(tmp_path / "only_text"), out])
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n")
    assert "listed twice" in data_prep_error(capsys, ["shard", str(tree.root), out, "--classes", str(dup)])
    assert "cannot read" in data_prep_error(capsys, ["shard", str(tree.root), out, "--classes", str(tmp_path / "x")])
    bad = tmp_path / "bad.jsonl"
    # a bad row is a reject naming file:line (the job goes on); a manifest of bad rows only is one line
    bad.write_text('{"path": "src/dog/img_000.jpg"}\n')
    assert "bad_label (bad.jsonl:1: missing 'label'" in data_prep_error(capsys, ["shard", str(bad), out])
    bad.write_text('not json\n')
    assert "bad.jsonl:1: bad_label (bad.jsonl:1: invalid JSON" in data_prep_error(capsys, ["shard", str(bad), out])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,class\na.jpg,cat\n")
    assert "'path' and 'label'" in data_prep_error(capsys, ["shard", str(bad_csv), out])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_bytes(b"%PDF")
    assert "not empty" in data_prep_error(capsys, ["shard", str(tree.root), str(foreign)])
    assert "inside SRC" in data_prep_error(capsys, ["shard", str(tree.root), str(tree.root / "cat" / "out")])
    assert "--split" in data_prep_error(capsys, ["shard", str(tree.root), out, "--split", "a.b"])
    (tmp_path / "afile").write_text("x")
    assert "is a file" in data_prep_error(capsys, ["shard", str(tree.root), str(tmp_path / "afile")])
    assert "_info.json not found" in data_prep_error(capsys, ["verify", str(tmp_path)])
    dead = f"127.0.0.1:{free_port()}"
    assert "nothing answers there" in data_prep_error(capsys, ["shard", str(tree.root), out, "--ray-address", dead])
    assert "host:port" in data_prep_error(capsys, ["shard", str(tree.root), out, "--ray-address", "nowhere"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--split", "--classes", "--shard-size", "--seed", "--max-size", "--quality", "--dedup",
                   "--workers", "--ray-address", "--overwrite", "example:"):
        assert option in text
