"""Multi-label sources (JSONL/CSV `labels`, OpenImages annotations), samples, _info.json, verify, demo data.

The images are the multi-label demo set (2-3 shapes each, labels known exactly from its labels.jsonl);
every test derives its expectations from those labels, not from snapshots. Only the last test starts Ray.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from core.files import atomic_write_json
from data_prep.cli import main
from data_prep.demo_data import DemoDataConfig
from data_prep.demo_multi import generate_multi
from data_prep.shard.plan import sample_key
from data_prep.sources.listing import list_inputs
from data_prep.shard.tasks import write_shard
from data_prep.shard.verify import verify_out
from tests.conftest import data_prep_error

KNOWN = ["circle", "square", "triangle", "star"]   # --classes: "cross" (class 5 of the demo set) is unknown
OPENIMAGES_HEADER = "ImageID,Source,LabelName,Confidence"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def demo(tmp_path) -> Path:
    """10 images, 5 shape classes, 2-3 per image; plus a copy used for an all-unknown image."""
    root = tmp_path / "demo"
    generate_multi(DemoDataConfig(out=root, classes=5, per_class=2, size=32, seed=0, label_set="multi"))
    shutil.copy(root / "images" / "multi_00000.jpg", root / "images" / "zebra.jpg")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in KNOWN), encoding="utf-8")
    return root


def _demo_labels(root: Path) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in (root / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["path"]: r["labels"] for r in rows}


def _source_labels(root: Path) -> dict[str, list[str]]:
    """path -> labels as a source lists them: the demo's, plus odd rows every format must handle."""
    labels = _demo_labels(root)
    assert any("cross" in v for v in labels.values()) and all(len(v) >= 2 for v in labels.values())
    first = next(iter(labels))
    labels[first] = ["star", *labels[first], "star"]   # listed twice: kept once, at its first place
    labels["images/zebra.jpg"] = ["zebra", "cross"]      # no known label: rejected as unknown_class
    labels["images/gone.jpg"] = ["circle"]                # no such file: missing_file, the job goes on
    return labels


def _expected(labels: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """What the shards must hold: known labels in source order without repeats; labels dropped."""
    kept, dropped = {}, 0
    for path, names in labels.items():
        unique = list(dict.fromkeys(names))
        known = [n for n in unique if n in KNOWN]
        if known and path != "images/gone.jpg":
            kept[path] = known
            dropped += len(unique) - len(known)
    return kept, dropped


def _write_sources(root: Path, labels: dict[str, list[str]]) -> dict[str, Path]:
    jsonl = root / "multi.jsonl"
    rows = [{"path": p, "labels": v} if len(v) > 1 else {"path": p, "label": v[0]} for p, v in labels.items()]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    csv = root / "multi.csv"
    csv.write_text("path,labels\n" + "".join(f"{p},{'|'.join(v)}\n" for p, v in labels.items()), encoding="utf-8")
    oi = root / "annotations.csv"
    lines = [OPENIMAGES_HEADER]
    for path, names in labels.items():
        image_id = Path(path).stem
        lines.append(f"{image_id},verification,dog,0")   # a negative label: never a label of the image
        lines += [f"{image_id},verification,{n},1" for n in names]
    lines += ["onlyneg,verification,circle,0", "onlyneg,verification,square,0.0"]
    (root / "images" / "onlyneg.jpg").write_bytes((root / "images" / "multi_00001.jpg").read_bytes())
    oi.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jsonl": jsonl, "csv": csv, "openimages": oi}


# ---------------------------------------------------------------- demo data

def test_multi_label_demo_is_deterministic_and_a_manifest(tmp_path, capsys):
    argv = ["demo-data", "--classes", "5", "--per-class", "4", "--size", "32", "--seed", "1", "--label-set", "multi"]
    assert main([*argv[:1], str(tmp_path / "a"), *argv[1:]]) == 0
    assert main([*argv[:1], str(tmp_path / "b"), *argv[1:]]) == 0
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b, "same arguments must give byte-identical files"
    assert len([k for k in a if k.endswith(".jpg")]) == 20
    assert a["classes.txt"].decode().split() == ["circle", "square", "triangle", "star", "cross"]
    labels = _demo_labels(tmp_path / "a")
    assert sorted(labels) == sorted(k for k in a if k.endswith(".jpg"))
    assert all(2 <= len(v) <= 3 and len(set(v)) == len(v) for v in labels.values())
    assert not any((tmp_path / "a" / name).is_dir() for name in ("circle", "square"))  # not an ImageFolder
    assert main([*argv[:1], str(tmp_path / "a"), *argv[1:], "--overwrite"]) == 0
    assert _tree_bytes(tmp_path / "a") == b
    capsys.readouterr()
    assert main(["demo-data", str(tmp_path / "a"), "--label-set", "multi"]) == 2  # not empty
    assert main(["demo-data", str(tmp_path / "c"), "--label-set", "multi", "--classes", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--overwrite" in err[0] and "1..8" in err[1]


# ---------------------------------------------------------------- listing: the three formats agree

@pytest.mark.parametrize("kind", ["jsonl", "csv", "openimages"])
def test_listing_keeps_known_labels_in_source_order(demo, kind):
    labels = _source_labels(demo)
    sources = _write_sources(demo, labels)
    images = demo / "images" if kind == "openimages" else None
    listing = list_inputs(sources[kind], "auto", demo / "classes.txt", images)
    assert listing.kind == ("openimages" if kind == "openimages" else "manifest")
    assert listing.multi_label and listing.classes == KNOWN
    kept, dropped = _expected(labels)
    to_id = (lambda p: Path(p).name) if kind == "openimages" else (lambda p: p)  # noqa: E731
    assert {i.id: list(i.labels) for i in listing.inputs} == {to_id(p): v for p, v in kept.items()}
    assert all(i.class_name == i.labels[0] for i in listing.inputs)
    assert listing.unknown_labels_dropped == dropped > 0
    rejects = {r.id: r.reason for r in listing.rejects}
    expected = {to_id("images/zebra.jpg"): "unknown_class", to_id("images/gone.jpg"): "missing_file"}
    if kind == "openimages":
        expected["onlyneg.jpg"] = "no_label"
    assert rejects == expected
    # without --classes every label found is a class (the negative "dog" of OpenImages is not)
    assert list_inputs(sources[kind], "auto", None, images).classes == sorted(
        {n for v in labels.values() for n in v})


def test_single_label_manifests_stay_single_label(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    one = tmp_path / "one.jsonl"
    one.write_text('{"path": "a.jpg", "label": "cat"}\n', encoding="utf-8")
    listing = list_inputs(one, "auto", None)
    assert not listing.multi_label and listing.inputs[0].labels == ()
    # one row with `labels` makes the whole manifest multi-label, rows with `label` included
    (tmp_path / "b.jpg").write_bytes(b"y")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"path": "a.jpg", "label": "cat"}\n{"path": "b.jpg", "labels": ["dog", "cat"]}\n',
                     encoding="utf-8")
    listing = list_inputs(mixed, "auto", None)
    assert listing.multi_label and [list(i.labels) for i in listing.inputs] == [["cat"], ["dog", "cat"]]


# ---------------------------------------------------------------- samples and verify (no Ray)

def _multi_rows(demo: Path) -> list[list]:
    rows = []
    for path, names in _demo_labels(demo).items():
        full = demo / path
        data = full.read_bytes()
        ints = [KNOWN.index(n) if n in KNOWN else 4 for n in names]
        rows.append([sample_key(path), path, str(full), -1, len(data), ints[0], names[0],
                     hashlib.sha1(data).hexdigest(), 32, 32, ints, names])
    return rows


def _info_for(out: Path, receipt: dict, classes: list[str]) -> None:
    shard = {k: receipt[k] for k in ("filename", "num_samples", "bytes", "sha256")}
    atomic_write_json(out / "_info.json", {"splits": {"train": {
        "name": "train", "num_samples": shard["num_samples"], "filenames": [shard["filename"]],
        "shard_lengths": [shard["num_samples"]], "shards": [shard], "classes": classes, "multi_label": True}}})


def test_multi_label_samples_and_verify(demo, tmp_path):
    classes = [*KNOWN, "cross"]
    rows = _multi_rows(demo)
    out = tmp_path / "out"
    out.mkdir()
    receipt = write_shard(str(out), "train", "train-000000.tar", "h", rows, {"max_size": 32})
    url = str(out / "train-000000.tar")
    raw = list(wds.WebDataset(url, shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in raw] == [["cls", "jpg", "json", "labels"]] * 10
    for sample, row in zip(raw, rows):
        assert sample["labels"].decode("ascii") == ",".join(map(str, row[10]))
        meta = json.loads(sample["json"])
        assert (meta["label"], meta["class"], meta["labels"], meta["classes"]) == (row[5], row[6], row[10], row[11])
    decoded = list(wds.WebDataset(url, shardshuffle=False).decode())  # stock decoders: cls is an int
    assert [s["cls"] for s in decoded] == [r[10][0] for r in rows]
    _info_for(out, receipt, classes)
    assert verify_out(out).ok

    bad = [list(r) for r in rows]
    bad[0][10] = [bad[0][10][1], bad[0][10][0]]          # cls is no longer the first label
    bad[1][10] = [*bad[1][10], len(classes)]             # a label outside the class list
    bad[2][10], bad[2][11] = [bad[2][10][0]] * 2, [bad[2][11][0]] * 2  # a repeated label
    receipt = write_shard(str(out), "train", "train-000000.tar", "h2", bad, {"max_size": 32})
    _info_for(out, receipt, classes)
    report = verify_out(out)
    failures = [line for line in report.lines if line.startswith("FAIL")]
    assert len(failures) == 3, report.lines
    assert sum("cls must be the first" in f for f in failures) == 1
    assert sum("repeated or outside" in f for f in failures) == 2


# ---------------------------------------------------------------- one-line errors, exit 2 (no Ray)

def test_bad_multi_label_input_is_one_line(demo, tmp_path, capsys):
    out = str(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    # a bad row is a reject naming file:line, and the job goes on: here every row is bad, so it stops
    bad.write_text('{"path": "b.jpg", "labels": []}\n', encoding="utf-8")
    assert "bad.jsonl:1: empty label list" in data_prep_error(capsys, ["shard", str(bad), out])
    bad.write_text('{"path": "a.jpg", "labels": "cat"}\n', encoding="utf-8")
    assert "bad.jsonl:1: 'labels' must be a JSON list" in data_prep_error(capsys, ["shard", str(bad), out])
    bad.write_text('{"path": "a.jpg", "label": "cat", "labels": ["cat"]}\n', encoding="utf-8")
    assert "not both" in data_prep_error(capsys, ["shard", str(bad), out])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,labels\nb.jpg,\n", encoding="utf-8")
    assert "bad.csv:2: empty label list" in data_prep_error(capsys, ["shard", str(bad_csv), out])
    bad_csv.write_text("path,labels\na.jpg,cat||dog\n", encoding="utf-8")
    assert "bad.csv:2: empty label" in data_prep_error(capsys, ["shard", str(bad_csv), out])
    bad_csv.write_text("path,tags\na.jpg,cat\n", encoding="utf-8")
    assert "'label' (one class) or 'labels'" in data_prep_error(capsys, ["shard", str(bad_csv), out])
    sources = _write_sources(demo, _source_labels(demo))
    assert "--images DIR" in data_prep_error(capsys, ["shard", str(sources["openimages"]), out])
    assert "is only for an OpenImages" in data_prep_error(
        capsys, ["shard", str(sources["csv"]), out, "--images", str(demo / "images")])
    assert "not a folder" in data_prep_error(
        capsys, ["shard", str(sources["openimages"]), out, "--images", str(tmp_path / "nope")])
    bad_oi = tmp_path / "oi.csv"
    bad_oi.write_text(f"{OPENIMAGES_HEADER}\nx,verification,circle,sure\n", encoding="utf-8")
    assert "bad_row (oi.csv:2: Confidence 'sure' is not a number)" in data_prep_error(  # a reject; no row is left
        capsys, ["shard", str(bad_oi), out, "--images", str(demo / "images")])
    assert "header is ImageID" in data_prep_error(capsys, ["shard", str(bad_csv), out, "--source", "openimages"])


# ---------------------------------------------------------------- end to end on Ray: the three formats

def _info(out: Path) -> dict:
    return json.loads((out / "_info.json").read_text(encoding="utf-8"))


def _rejects(out: Path) -> dict[str, str]:
    records = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["source"]: r["reason"] for r in records}


@pytest.mark.slow
def test_three_formats_give_exact_shards(demo, tmp_path):
    import ray

    from data_prep.shard.cluster import init_local_ray
    from data_prep.shard.job import ShardConfig, run_shard_job

    labels = _source_labels(demo)
    sources = _write_sources(demo, labels)
    kept, dropped = _expected(labels)
    started = not ray.is_initialized()
    if started:
        init_local_ray(num_cpus=1)
    try:
        by_kind = {}
        for kind, src in sources.items():
            out = tmp_path / f"out-{kind}"
            images = demo / "images" if kind == "openimages" else None
            cfg = ShardConfig(src=src, out=out, classes_file=demo / "classes.txt", images=images, shard_size=4,
                              max_size=32, progress=False)
            result = run_shard_job(cfg)
            split = _info(out)["splits"]["train"]
            prefix = "" if kind == "openimages" else "images/"
            expected = {prefix + Path(p).name: v for p, v in kept.items()}
            assert result.num_samples == split["num_samples"] == len(expected)
            assert split["multi_label"] is True and split["classes"] == KNOWN
            counts = split["counts"]
            assert counts["per_class"] == {c: sum(c in v for v in expected.values()) for c in KNOWN}
            assert counts["unknown_labels_dropped"] == dropped
            sizes = [len(v) for v in expected.values()]
            assert split["labels_per_image"] == {"mean": round(sum(sizes) / len(sizes), 4), "max": max(sizes)}
            reasons = {prefix + "zebra.jpg": "unknown_class", prefix + "gone.jpg": "missing_file"}
            if kind == "openimages":
                reasons["onlyneg.jpg"] = "no_label"
            assert _rejects(out) == reasons
            urls = [str(out / name) for name in split["filenames"]]
            samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
            got = {s["json"]["source"]: s for s in samples}
            assert {k: s["json"]["classes"] for k, s in got.items()} == expected
            for source, sample in got.items():
                ints = [KNOWN.index(n) for n in expected[source]]
                assert sample["cls"] == ints[0] and sample["json"]["labels"] == ints
                assert sample["labels"] == ",".join(map(str, ints)).encode("ascii")
            assert main(["verify", str(out)]) == 0
            by_kind[kind] = {s["json"]["sha1"]: (s["labels"], s["jpg"]) for s in samples}
            if kind == "jsonl":
                assert run_shard_job(cfg).up_to_date  # the same command again: nothing to do
        assert by_kind["jsonl"] == by_kind["csv"] == by_kind["openimages"]  # same images, same samples
    finally:
        if started:
            ray.shutdown()
