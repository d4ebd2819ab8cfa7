"""Near-duplicate removal against evaluation sets (`shard --exclude-near`) on real photographs (skimage.data
via tests/real_objects.py: a perceptual hash behaves differently on flat drawings), and its index."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.limits import Limits
from data_prep.near_dup.exclude import list_eval_sets
from data_prep.near_dup.hashing import NEAR_DISTANCE, bytes_hash, hamming
from data_prep.near_dup.index import NearIndex
from tests.conftest import data_prep_error
from tests.real_objects import altered_copy, distinct_photos, jpeg_bytes

EVAL = ("astronaut", "coffee", "rocket", "chelsea")
OTHERS = ("camera", "brick", "moon", "coins")
COPIES = ("reencoded_q50", "resized_half", "brightened_25pct", "cropped_2pct")


@pytest.mark.parametrize("max_distance, chunks", [(0, None), (3, None), (8, None), (10, None), (14, None),
                                                  (8, 3), (5, 2)])  # 21-32 bit chunks: binary search, r > 0
def test_index_finds_exactly_the_hashes_within_the_distance(max_distance, chunks):
    """Multi-index hashing is exact: the same matches as comparing against every stored hash, ties to the
    lowest row, on hashes planted at every distance around the threshold."""
    rng = np.random.default_rng(max_distance)
    stored = rng.integers(0, 1 << 63, size=3000, dtype=np.uint64) << np.uint64(1)
    stored[10] = stored[5]  # a tie: the lowest row wins
    queries = stored[:400].copy()
    for i in range(len(queries)):
        for bit in rng.choice(64, i % (max_distance + 4), replace=False):
            queries[i] ^= np.uint64(1) << np.uint64(int(bit))
    queries[7] = stored[5]  # equally near rows 5 and 10
    rows, dist = NearIndex(stored, max_distance, chunks).nearest(queries)
    brute = hamming(queries[:, None], stored[None, :])
    expect_dist = brute.min(axis=1)
    expect_rows = np.where(expect_dist <= max_distance, brute.argmin(axis=1), -1)
    assert (rows == expect_rows).all()
    assert (dist == np.where(expect_dist <= max_distance, expect_dist, -1)).all()
    assert 0 < (rows >= 0).sum() < len(queries)  # both kinds of query were asked
    assert rows[7] == 5 and dist[7] == 0


def test_altered_copies_hash_near_and_distinct_photographs_far():
    """The hash itself on photographs: every copy in COPIES lands within the default distance with a margin,
    and no two distinct photographs or tiles (of the same photographs too) come that close."""
    images = distinct_photos(3, EVAL + OTHERS)
    hashes = np.array([bytes_hash(jpeg_bytes(im), 1 << 30) for _name, im in images], np.uint64)
    originals = dict(images)
    for name in EVAL:
        base = np.uint64(bytes_hash(jpeg_bytes(originals[name]), 1 << 30))
        for kind in COPIES:
            assert hamming(base, np.uint64(bytes_hash(altered_copy(originals[name], kind), 1 << 30))) \
                <= NEAR_DISTANCE - 2, (name, kind)
    pairwise = hamming(hashes[:, None], hashes[None, :])[np.triu_indices(len(hashes), 1)]
    assert pairwise.min() > NEAR_DISTANCE + 4


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """eval/all/<photo>.jpg; train/<class>/: altered copies of the eval photos (near duplicates) and distinct
    photographs: the eval photos' own tiles (hard negatives) and other photographs."""
    root = tmp_path_factory.mktemp("near-dup")
    images = dict(distinct_photos(3, EVAL + OTHERS))
    for name in EVAL:
        _write(root / "eval" / "all" / f"{name}.jpg", jpeg_bytes(images[name]))
    near, distinct = {}, []
    for name in EVAL:
        for kind in COPIES:
            file_id = f"copies/{name}-{kind}.jpg"
            _write(root / "train" / file_id, altered_copy(images[name], kind))
            near[file_id] = f"all/{name}.jpg"
    for name, image in images.items():
        if name not in EVAL:
            file_id = f"distinct/{name}.jpg"
            _write(root / "train" / file_id, jpeg_bytes(image))
            distinct.append(file_id)
    return root, near, distinct


def _shard(src: Path, out: Path, *extra: str) -> int:
    return main(["shard", str(src), str(out), "--shard-size", "16", "--max-size", "64", "--no-progress",
                 "--workers", "2", *extra])


def _sources(out: Path) -> list[str]:
    found = []
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as handle:
            found += [json.loads(handle.extractfile(m).read())["source"] for m in handle if m.name.endswith(".json")]
    return found


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


@pytest.mark.slow
def test_exclude_near_rejects_altered_copies_keeps_distinct_and_is_deterministic(photo_sets, local_ray, tmp_path,
                                                                               capsys):
    root, near, distinct = photo_sets
    out = tmp_path / "out"
    assert _shard(root / "train", out, "--exclude-near", str(root / "eval")) == 0
    # every distinct photograph written exactly once, no altered copy
    assert sorted(_sources(out)) == sorted(distinct)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    matched = {r["source"]: r for r in rejects if r["reason"] == "near_duplicate"}
    assert sorted(matched) == sorted(near)
    for source, reject in matched.items():
        assert reject["eval_id"] == near[source] and reject["eval_set"] == str(root / "eval")
        assert 0 <= reject["distance"] <= NEAR_DISTANCE and near[source] in reject["detail"]
    entry = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert entry["num_samples"] == len(distinct) and entry["counts"]["rejected"] == {"near_duplicate": len(near)}
    record = entry["exclude_near"]
    assert record["max_distance"] == NEAR_DISTANCE and record["removed"] == len(near)
    assert [s["source"] for s in record["eval_sets"]] == [str(root / "eval")]
    assert record["eval_sets"][0]["images"] == len(EVAL)
    assert entry["options"]["near_distance"] == NEAR_DISTANCE

    # our own shards as the eval set: the same images rejected, so the same shards byte for byte
    eval_shards = tmp_path / "eval-shards"
    assert main(["shard", str(root / "eval"), str(eval_shards), "--split", "train", "--max-size", "128",
                 "--no-progress", "--workers", "2"]) == 0
    other = tmp_path / "out-from-shards"
    assert _shard(root / "train", other, "--exclude-near", str(eval_shards)) == 0
    assert _tars(other) == _tars(out)

    # the same command again: nothing to do; another threshold: refused in one line, naming it
    capsys.readouterr()
    assert _shard(root / "train", out, "--exclude-near", str(root / "eval")) == 0
    assert "up to date" in capsys.readouterr().out
    err = data_prep_error(capsys, ["shard", str(root / "train"), str(out), "--shard-size", "16", "--max-size",
                                   "64", "--exclude-near", str(root / "eval"), "--near-distance", "4"])
    assert "near_distance 10 -> 4" in err and "--overwrite" in err
    err = data_prep_error(capsys, ["shard", str(root / "train"), str(out), "--shard-size", "16", "--max-size", "64"])
    assert "near_distance 10 -> None" in err  # dropping --exclude-near is a change too

    # --overwrite re-scans but takes the eval hashes from OUT/_state/near_dup/: same bytes again
    before = _tars(out)
    assert _shard(root / "train", out, "--exclude-near", str(root / "eval"), "--overwrite") == 0
    assert "hashes from the cache" in capsys.readouterr().err
    assert _tars(out) == before


def test_a_flat_eval_folder_is_listed_without_classes(tmp_path):
    """ImageNet-1K val as ILSVRC ships it (one folder of files, no class folders) is a valid eval set."""
    flat = tmp_path / "val"
    flat.mkdir()
    for n, (_name, image) in enumerate(distinct_photos(0, EVAL)):
        (flat / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(image.resize((40, 40))))
    (flat / "README.txt").write_text("not an image")
    [(name, listing)] = list_eval_sets([flat], tmp_path / "spill", Limits())
    assert name == str(flat) and listing.num_inputs == len(EVAL) and listing.rejected == 1


def test_exclude_near_bad_eval_is_one_line(photo_sets, tmp_path, capsys):
    root, _near, _distinct = photo_sets
    err = data_prep_error(capsys, ["shard", str(root / "train"), str(tmp_path / "out"), "--exclude-near",
                                   str(tmp_path / "missing")])
    assert err.startswith("error: --exclude-near ") and "missing" in err


@pytest.mark.slow
def test_dedup_reports_the_altered_copies_as_groups(photo_sets, local_ray, tmp_path, capsys):
    """`data_prep dedup SRC`: one group per photograph whose altered copies are in SRC, no distinct image in
    any group; JSON lines, nothing written beside SRC."""
    root, near, distinct = photo_sets
    report = tmp_path / "groups.jsonl"
    before = sorted(p.name for p in (root / "train").rglob("*"))
    assert main(["dedup", str(root / "train"), "--out", str(report), "--workers", "2"]) == 0
    groups = [json.loads(line) for line in report.read_text().splitlines()]
    expected = {}
    for copy, original in near.items():
        expected.setdefault(original, []).append(copy)
    assert sorted(g["ids"] for g in groups) == sorted(sorted(ids) for ids in expected.values())
    for group in groups:
        assert group["size"] == len(group["ids"]) and group["distances"][0] == 0
        assert max(group["distances"]) <= NEAR_DISTANCE
    assert f"{len(near) + len(distinct)} images hashed" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "train").rglob("*")) == before
