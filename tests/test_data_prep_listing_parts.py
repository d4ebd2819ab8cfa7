"""The listing in parts (data_prep.shard.listing_parts): the same listing and shards as one process, and a job
SIGKILLed while listing resumes without listing its finished parts again."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_prep.shard.config import ShardConfig
from data_prep.shard.listing_parts import list_in_parts, listing_dir
from data_prep.sources.listing import list_partitioned
from data_prep.sources.parts import plan_parts
from data_prep.spill import PARTITIONS, read_spill
from tests.test_data_prep_helpers import _rgb, encode
from tests.test_data_prep_packed import _parquet_source, _webdataset_source

REPO = Path(__file__).resolve().parents[1]


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    archive.addfile(info, io.BytesIO(data))


def _class_tars(root: Path, classes: int = 4, per_class: int = 5, filler: int = 0) -> None:
    """<class>.tar archives of small JPEGs, a non-image member each, `filler` .txt members each (listed and
    rejected, never scanned: they make listing take time), and one tar damaged after its first members."""
    root.mkdir(parents=True)
    for c in range(classes):
        with tarfile.open(root / f"n{c:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(per_class):
                _member(archive, f"n{c:04d}_{i}.JPEG", encode(_rgb(100 * c + i, 32, 32), "JPEG"))
            _member(archive, "README.txt", b"not an image")
            for i in range(filler):
                _member(archive, f"pad/{i:05d}.txt", b"x")
    with tarfile.open(root / "n0001.tar") as archive:
        at = archive.getmembers()[2].offset
    data = (root / "n0001.tar").read_bytes()
    (root / "n0001.tar").write_bytes(data[:at] + b"\x7f" * 512 + data[at + 512:])  # the 3rd header: garbage


def _inline(fn, calls, _in_flight, on_result) -> None:
    """The part tasks run in this process, one after another (job._run_remote's contract, without Ray)."""
    for index, call in enumerate(calls):
        on_result(index, fn(*call))


def _listing_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


@pytest.mark.parametrize("kind", ["tars", "webdataset", "parquet"])
def test_listing_in_parts_equals_the_one_process_listing(tmp_path, capsys, kind):
    """Every part listed alone, then merged: the same judged inputs, rejects (same order), classes, counts and
    fingerprint as one process -- so the same shards. A second merge lists nothing and is the same again."""
    src, extra = tmp_path / "src", {}
    if kind == "tars":
        _class_tars(src)
        bad = os.path.join(os.fsencode(src), b"n\xff.tar")  # a file name that is not UTF-8: its rows are rejects
        with open(bad, "wb") as handle:
            handle.write((src / "n0000.tar").read_bytes())
    elif kind == "webdataset":
        _webdataset_source(src)
        extra = {"label_field": "label", "label_map": src / "labels.json"}
    else:
        _parquet_source(src)
    cfg = ShardConfig(src=src, out=tmp_path / "out", seed=3, progress=False, **extra)
    one = list_partitioned(src, "auto", None, cfg.seed, tmp_path / "one", label_field=cfg.label_field,
                           label_map=cfg.label_map, limits=cfg.limits())
    plan = plan_parts(src, "auto", cfg.seed, cfg.label_field, cfg.label_map, cfg.limits())
    assert plan is not None and len(plan.parts) >= 2
    listings = []
    for run in ("first", "again"):
        spill = tmp_path / run
        spill.mkdir()
        listings.append(list_in_parts(cfg, plan, spill, lambda: 1, _inline, None,  # the judge by groups:
                                      lambda fn, calls: [fn(*call) for call in calls]))  # in process too
        assert _listing_files(spill) == _listing_files(tmp_path / "one"), run
    receipts = sorted(listing_dir(cfg.out, cfg.split).glob("*.json"))
    assert len(receipts) == len(plan.parts)
    for parts in listings:
        for field in ("kind", "classes", "class_source", "fingerprint", "multi_label", "unknown_labels_dropped",
                      "counts", "listed", "input_bytes", "rejected", "non_image_files"):
            assert getattr(parts, field) == getattr(one, field), (kind, field)
    if kind == "tars":
        assert (one.rejected, one.non_image_files) == (3 + 1 + 6, 3)  # READMEs; the damaged tar's rest; n\xff.tar
    if kind == "tars":  # a rewritten part (new mtime) is listed again, the others are not
        os.utime(src / "n0002.tar", ns=(1, 1))
        spill = tmp_path / "changed"
        spill.mkdir()
        capsys.readouterr()
        assert list_in_parts(cfg, plan_parts(src, "auto", cfg.seed, None, None, cfg.limits()), spill, lambda: 1,
                             _inline, None).fingerprint == one.fingerprint  # mtime of the archive, not its members
        assert "resumed listing: 4 of 5 parts already listed" in capsys.readouterr().err
        victim = sorted(listing_dir(cfg.out, cfg.split).glob("*.jsonl.gz"))[0]  # damaged in place, same size
        victim.write_bytes(b"\0" * victim.stat().st_size)
        spill = tmp_path / "healed"
        spill.mkdir()
        assert list_in_parts(cfg, plan_parts(src, "auto", cfg.seed, None, None, cfg.limits()), spill, lambda: 1,
                             _inline, None).fingerprint == one.fingerprint
        err = capsys.readouterr().err
        assert "resumed listing: 5 of 5 parts already listed" in err and "is damaged or gone" in err  # listed again
        assert _listing_files(spill) == _listing_files(tmp_path / "one")
        (src / "n0003.tar").rename(src / "n0009.tar")  # the old name's result is not kept
        spill = tmp_path / "renamed"
        spill.mkdir()
        list_in_parts(cfg, plan_parts(src, "auto", cfg.seed, None, None, cfg.limits()), spill, lambda: 1, _inline,
                      None)
        state = listing_dir(cfg.out, cfg.split)
        assert len(list(state.glob("*.json"))) == len(list(state.glob("*.jsonl.gz"))) == 5


def _shard_cmd(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "data_prep", "shard", str(src), str(out), "--shard-size", "4", "--max-size", "32",
            "--workers", str(workers), "--no-progress"]


def _receipts(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in listing_dir(out, "train").glob("*.json")}


@pytest.mark.slow
def test_sigkilled_listing_resumes_without_relisting_and_shards_match_one_process(local_ray, tmp_path):
    """SIGKILL the whole job (driver, its private Ray) once some parts are listed: the rerun says how many it
    keeps, leaves their receipts untouched, lists the rest on 2 workers, and writes the same shards and
    rejects, byte for byte, as a one-process listing (in this process, on the module's Ray)."""
    from data_prep.shard.job import run_shard_job

    parts = 16
    src = tmp_path / "src"
    _class_tars(src, classes=parts, per_class=2, filler=1500)  # ~1,500 headers per part: listing takes seconds
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(_shard_cmd(src, out, 1), cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _receipts(out) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, job.stderr.read().decode()[-2000:]
    time.sleep(1.0)  # a Ray worker of the killed job could still be finishing a part: let it, then look
    kept = _receipts(out)
    assert 0 < len(kept) < parts, f"{len(kept)} of {parts} parts listed when killed"

    rerun = subprocess.run(_shard_cmd(src, out, 2), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stderr.splitlines() if line.startswith("resumed listing: ")]
    assert resumed == [f"resumed listing: {len(kept)} of {parts} parts already listed"], rerun.stderr[-3000:]
    after = _receipts(out)
    assert len(after) == parts and {name: after[name] for name in kept} == kept  # not rewritten

    one = tmp_path / "one"
    run_shard_job(ShardConfig(src=src, out=one, shard_size=4, max_size=32, progress=False, list_in_parts=False))
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert len(shards) == (2 * parts - 2) // 4 + 1 and shards == sorted(p.name for p in one.glob("*.tar"))
    for name in shards:
        assert (out / name).read_bytes() == (one / name).read_bytes(), name
    assert (out / "rejects.jsonl").read_bytes() == (one / "rejects.jsonl").read_bytes()

    done = subprocess.run(_shard_cmd(src, out, 2), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "is up to date" in done.stdout, done.stderr[-3000:]
    assert f"resumed listing: {parts} of {parts} parts already listed" in done.stderr  # nothing listed, no Ray
    assert "Ray ready" not in done.stderr and _receipts(out) == after


def test_a_classes_mapping_applies_to_tars_listed_in_parts_as_in_one_process(tmp_path):
    """Per-class tars named by a raw name, a --classes mapping onto synsets: the judge (here by groups, as on Ray)
    maps each tar's label as the one-process judge does, and the listing is the same, mapped classes and all."""
    src = tmp_path / "src"
    _class_tars(src)
    mapping = tmp_path / "classes.csv"
    mapping.write_text("".join(f"n{c:04d},syn{9 - c}\n" for c in range(4)))
    cfg = ShardConfig(src=src, out=tmp_path / "out", seed=1, progress=False, classes_file=mapping)
    one = list_partitioned(src, "auto", mapping, cfg.seed, tmp_path / "one", limits=cfg.limits())
    spill = tmp_path / "parts"
    spill.mkdir()
    parts = list_in_parts(cfg, plan_parts(src, "auto", cfg.seed, None, None, cfg.limits()), spill, lambda: 1,
                          _inline, None, lambda fn, calls: [fn(*call) for call in calls])
    assert one.classes == parts.classes == ["syn9", "syn8", "syn7", "syn6"]
    assert (parts.fingerprint, parts.counts) == (one.fingerprint, one.counts)
    assert _listing_files(spill) == _listing_files(tmp_path / "one")
    labels = [row[2] for p in range(PARTITIONS) if parts.counts[p] for row in read_spill(parts.inputs_path(p))]
    assert len(labels) == sum(parts.counts) > 0 and set(labels) == set(parts.classes)


def _manifest(src: Path, fmt: str) -> Path:
    """A manifest of 60 rows in a few ranges: multi-label rows, a missing file, bad rows, a blank line, a
    path with a comma (quoted in CSV) and a CSV field quoted over a line break inside a range."""
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(60):
        name = f"img/{i:03d},x.jpg" if i == 7 else f"img/{i:03d}.jpg"
        if i != 11:  # row 11: a missing file
            (src / name).write_bytes(b"\xff\xd8 not decoded while listing")
        labels = [f"c{i % 3}"] + ([f"c{(i + 1) % 3}"] if i % 4 == 0 else [])
        if fmt == "jsonl":
            rows.append(json.dumps({"path": name, "labels": labels}))
        else:
            rows.append(f'"{name}",{"|".join(labels)}')
        if i == 20:
            rows.append('{"path": "img/000.jpg", "labels": [' if fmt == "jsonl" else ',c1')  # bad: no path
        if i == 30:
            rows.append("" if fmt == "jsonl" else '"img/999\nbroken.jpg",c2')  # blank; CSV: a field over 2 lines
        if i == 40:
            rows.append('{"path": "img/001.jpg"}' if fmt == "jsonl" else "img/001.jpg,")  # bad: no label
    manifest = src / f"manifest.{fmt}"
    manifest.write_text(("path,labels\n" if fmt == "csv" else "") + "\n".join(rows) + "\n")
    return manifest


def _parts_listing(cfg: ShardConfig, spill: Path, monkeypatch, part_bytes: int):
    from data_prep.sources import manifest_ranges

    monkeypatch.setattr(manifest_ranges, "PART_BYTES", part_bytes)
    spill.mkdir()
    plan = plan_parts(cfg.src, "auto", cfg.seed, None, None, cfg.limits())
    return plan, list_in_parts(cfg, plan, spill, lambda: 1, _inline, None,
                               lambda fn, calls: [fn(*call) for call in calls])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_manifest_listed_in_byte_ranges_equals_one_process_and_resumes(tmp_path, capsys, monkeypatch, fmt):
    """A manifest cut into ranges at line starts, each listed alone: the same inputs, rejects (same order,
    line numbers of the whole file), classes, multi-label flag and fingerprint as one process; a rerun lists
    no range again. A path listed twice stops both with the same line; so does a CSV field quoted over a cut."""
    src = tmp_path / "src"
    manifest = _manifest(src, fmt)
    cfg = ShardConfig(src=manifest, out=tmp_path / "out", seed=5, progress=False)
    one = list_partitioned(manifest, "auto", None, cfg.seed, tmp_path / "one", limits=cfg.limits())
    plan, parts = _parts_listing(cfg, tmp_path / "parts", monkeypatch, 300)
    assert len(plan.parts) >= 4 and plan.parts[0].start == 0 and plan.parts[-1].end == manifest.stat().st_size
    assert _listing_files(tmp_path / "parts") == _listing_files(tmp_path / "one")
    for field in ("classes", "fingerprint", "multi_label", "counts", "listed", "input_bytes", "rejected"):
        assert getattr(parts, field) == getattr(one, field), field
    assert one.multi_label and one.classes == ["c0", "c1", "c2"] and one.rejected == 3 + (fmt == "csv")
    rejects = (tmp_path / "one" / "rejects.jsonl").read_text()
    assert f"manifest.{fmt}:{22 + (fmt == 'csv')}:" in rejects and "no such file" in rejects  # in range 2+
    capsys.readouterr()
    _parts_listing(cfg, tmp_path / "again", monkeypatch, 300)
    assert f"resumed listing: {len(plan.parts)} of {len(plan.parts)} parts already listed" in capsys.readouterr().err
    assert _listing_files(tmp_path / "again") == _listing_files(tmp_path / "one")

    text = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(text + [text[-5]]))  # a path listed again on the last line
    from core.errors import UserError

    with pytest.raises(UserError) as single:
        list_partitioned(manifest, "auto", None, cfg.seed, tmp_path / "one-dup", limits=cfg.limits())
    with pytest.raises(UserError) as split:
        _parts_listing(cfg, tmp_path / "parts-dup", monkeypatch, 300)
    assert str(split.value) == str(single.value) and "is already listed on line" in str(single.value)
    if fmt == "csv":  # the field quoted over a line break, now cut between two ranges
        at = manifest.read_bytes().index(b"img/999\n") + len(b"img/999\n")
        with pytest.raises(UserError, match="quoted CSV field runs over a line break"):
            _parts_listing(cfg, tmp_path / "parts-cut", monkeypatch, at)
