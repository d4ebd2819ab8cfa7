"""Partitioned planning (issue 12): the same order and shards as sorting everything at once; the benchmark runs."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from data_prep.shard.plan import shard_ranges, shuffle_ids
from data_prep.spill import PARTITIONS, SpillWriter, order_key, read_spill, sorted_spill
from data_prep.sources.listing import list_inputs, list_partitioned

ROOT = Path(__file__).resolve().parents[1]


def _partitioned_order(ids: list[str], seed: int, tmp: Path, limit: int | None = None) -> list[str]:
    """Spill by the key's top byte, sort each partition alone (split further by the next key bytes when it
    holds more than `limit` rows), concatenate: what the job does."""
    spill = SpillWriter(tmp, "t")
    for i in ids:
        key = order_key(i, seed)
        spill.add(key[0], [key.hex(), i])
    spill.close()
    order = []
    for part in range(PARTITIONS):
        if limit is None:
            order += [i for _k, i in sorted(read_spill(spill.path(part)))]
        else:
            order += [i for _k, i in sorted_spill(spill.path(part), spill.counts[part], lambda r: r, limit)]
    assert sorted(p.name for p in Path(tmp).iterdir()) == sorted(  # every sub-spill was cleaned up
        spill.path(part).name for part in range(PARTITIONS) if spill.counts[part])
    return order


def test_partitioned_order_and_shards_equal_one_global_sort(tmp_path):
    rng = random.Random(7)
    ids = [f"c{rng.randrange(50)}/img{n:05d}.jpg" for n in range(3000)]
    rng.shuffle(ids)  # listing order must not matter
    for seed in (0, 3):
        whole = shuffle_ids(ids, seed)
        assert _partitioned_order(ids, seed, tmp_path / str(seed)) == whole
        # partitions bigger than the sort limit are split by the next key bytes: still the one global order
        for limit in (1, 4):
            assert _partitioned_order(ids, seed, tmp_path / f"{seed}-{limit}", limit) == whole
        # usable inputs per partition -> shard ranges: shard i is exactly whole[i*S:(i+1)*S]
        usable = [0] * PARTITIONS
        by_part: list[list[str]] = [[] for _ in range(PARTITIONS)]
        for i in whole:
            usable[order_key(i, seed)[0]] += 1
            by_part[order_key(i, seed)[0]].append(i)
        for size in (1, 7, 1000, 5000):
            shards = shard_ranges(usable, size)
            got = [[i for p, a, b in ranges for i in by_part[p][a:b]] for ranges in shards]
            assert got == [whole[k:k + size] for k in range(0, len(whole), size)]


def test_partitioned_listing_matches_the_in_memory_one(tmp_path):
    root = tmp_path / "src"
    for n in range(60):
        path = root / f"c{n % 3}" / f"im{n:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * n)
    (root / "c1" / "notes.txt").write_text("no image")
    whole = list_inputs(root, "auto", None)
    parts = list_partitioned(root, "auto", None, 5, tmp_path / "spill")
    ids = [row[1] for p in range(PARTITIONS) for row in read_spill(parts.inputs_path(p))]
    assert ids == shuffle_ids([i.id for i in whole.inputs], 5)
    assert parts.classes == whole.classes and parts.listed == 61 and parts.non_image_files == 1
    # the fingerprint depends on the inputs, not on the order they were listed in or the seed
    again = list_partitioned(root, "auto", None, 9, tmp_path / "spill2")
    assert again.fingerprint == parts.fingerprint
    # a tiny sort limit (every partition split by the next key byte) changes nothing but the memory
    split = list_partitioned(root, "auto", None, 5, tmp_path / "spill4", sort_rows=1)
    assert [row for p in range(PARTITIONS) for row in read_spill(split.inputs_path(p))] == \
        [row for p in range(PARTITIONS) for row in read_spill(parts.inputs_path(p))]
    assert (split.fingerprint, split.counts, split.listed) == (parts.fingerprint, parts.counts, parts.listed)
    (root / "c0" / "im000.jpg").write_bytes(b"changed")
    assert list_partitioned(root, "auto", None, 5, tmp_path / "spill3").fingerprint != parts.fingerprint


def test_partitioned_listing_of_class_tars_streams_the_same_inputs(tmp_path):
    """One tar per class (ImageNet-21K's layout) is listed archive by archive into the spill files, member by
    member, with the same inputs (ids, offsets, sizes) as the in-memory listing."""
    import tarfile

    tars = tmp_path / "tars"
    tars.mkdir()
    for c in range(3):
        with tarfile.open(tars / f"n{c:08d}.tar", "w") as archive:
            for n in range(20):
                data = tmp_path / "member"
                data.write_bytes(b"y" * (n + 10 * c))
                archive.add(data, arcname=f"n{c:08d}_{n}.JPEG")
            archive.add(data, arcname="README.txt")
    whole = list_inputs(tars, "auto", None)
    parts = list_partitioned(tars, "auto", None, 5, tmp_path / "spill")
    rows = [row for p in range(PARTITIONS) for row in read_spill(parts.inputs_path(p))]
    assert [r[1] for r in rows] == shuffle_ids([i.id for i in whole.inputs], 5)
    by_id = {i.id: (i.class_name, i.path, i.offset, i.size) for i in whole.inputs}
    assert all(by_id[r[1]] == tuple(r[2:6]) for r in rows) and len(rows) == 60
    for _key, file_id, class_name, path, offset, size, _labels in rows:  # each member's bytes, read in place
        c, n = (int(x) for x in file_id.split("/")[1][1:-len(".JPEG")].split("_"))
        with open(path, "rb") as handle:
            handle.seek(offset)
            assert class_name == f"n{c:08d}" and handle.read(size) == b"y" * (n + 10 * c), file_id
    assert parts.classes == whole.classes == [f"n{c:08d}" for c in range(3)]
    assert parts.listed == 63 and parts.non_image_files == 3


def test_manifest_path_listed_twice_is_one_line_with_both_lines(tmp_path):
    import pytest

    from core.errors import UserError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.jpg", "label": "x"}\n{"path": "b.jpg", "label": "y"}\n'
                        '{"path": "a.jpg", "label": "y"}\n')
    with pytest.raises(UserError, match=r"m.jsonl:3: path 'a.jpg' is already listed on line 1"):
        list_partitioned(manifest, "auto", None, 0, tmp_path / "spill")
    # also when the partition is split (equal keys go down to the last key byte together)
    manifest.write_text('{"path": "a.jpg", "label": "x"}\n{"path": "b.jpg", "label": "y"}\n'
                        '{"path": "a.jpg", "label": "y"}\n{"path": "a.jpg", "label": "x"}\n')
    with pytest.raises(UserError, match=r"m.jsonl:3: path 'a.jpg' is already listed on line 1"):
        list_partitioned(manifest, "auto", None, 0, tmp_path / "spill2", sort_rows=1)


def test_benchmark_smoke_memory_is_reported(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/plan_scale.py", "--sizes", "5k,20k", "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peak memory x" in proc.stdout and "extrapolated to 1,000,000,000" in proc.stdout, proc.stdout


def test_external_sort_equals_sorted_and_is_stable(tmp_path):
    from data_prep.spill import external_sort

    rng = random.Random(3)
    rows = [{"source": f"s{rng.randrange(40):02d}", "n": n} for n in range(500)]  # many equal keys
    for limit in (1, 7, 499, 500, 10_000):
        got = list(external_sort(iter(rows), lambda r: r["source"], tmp_path, limit))
        assert got == sorted(rows, key=lambda r: r["source"])
    assert list(external_sort([], lambda r: r, tmp_path, 1)) == []
    assert not list(tmp_path.iterdir())  # the runs are gone
