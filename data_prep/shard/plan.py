"""From listing + scan to the exact content of every shard.

The plan is the single source of truth for exactly-once: each valid input appears in exactly one shard at
exactly one position, and a shard's bytes are a pure function of its entries and the image options.
Multi-label entries carry their label list too (two extra fields); single-label entries keep the ten
fields they always had, so their shard hashes, receipts and bytes are unchanged.

Shuffle: inputs are ordered by sha256(seed, id). This depends only on the input list and the seed (not on
numpy's or Python's RNG streams, which are not promised stable across versions), and adding or removing
one file moves no other file relative to the rest.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.files import atomic_path

from data_prep.images import ScanResult
from data_prep.sources.listing import Listing

PLAN_FORMAT = 1
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Entry:
    """One sample to write: everything the shard task needs, nothing it has to look up."""

    key: str
    id: str
    path: str
    offset: int
    size: int
    label: int
    class_name: str
    sha1: str
    width: int
    height: int
    labels: list[int] | None = None        # multi-label splits only: every label, labels[0] == label
    label_names: list[str] | None = None   # the class names of `labels`

    def to_list(self) -> list:
        """Single-label entries keep their 10 fields, so their shard hash (and receipts) stay as they were."""
        row = [self.key, self.id, self.path, self.offset, self.size, self.label, self.class_name, self.sha1,
               self.width, self.height]
        return row if self.labels is None else row + [list(self.labels), list(self.label_names or [])]


@dataclass
class Plan:
    fingerprint: str
    classes: list[str]
    shards: list[list[Entry]]
    rejects: list[dict]                          # {"source", "class", "reason", "detail"}, sorted by source
    counts: dict = field(default_factory=dict)
    multi_label: bool = False

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shards)


def sample_key(file_id: str) -> str:
    """Stable, unique, dot-free __key__: a readable slug of the file name plus 96 bits of sha1(id)."""
    stem = file_id.rsplit("/", 1)[-1].split(".", 1)[0]
    slug = _KEY_UNSAFE.sub("_", stem).strip("_-")[:40] or "img"
    return f"{slug}-{hashlib.sha1(file_id.encode('utf-8')).hexdigest()[:24]}"


def shuffle_ids(ids: list[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode("utf-8")).digest())


def shard_hash(entries: list[Entry]) -> str:
    """Identifies a shard's planned content; a receipt only counts for the plan it was written for."""
    return hashlib.sha256(json.dumps([e.to_list() for e in entries]).encode("utf-8")).hexdigest()


def build_plan(listing: Listing, scans: dict[str, ScanResult], fingerprint: str, shard_size: int, seed: int,
               dedup: bool) -> Plan:
    label_of = {name: i for i, name in enumerate(listing.classes)}
    rejects = [{"source": r.id, "class": r.class_name, "reason": r.reason, "detail": r.detail}
               for r in listing.rejects]
    valid, first_by_sha1, duplicates = {}, {}, 0
    for item in listing.inputs:  # id order: with --dedup the first copy by id wins
        result = scans[item.id]
        if result.reason is not None:
            rejects.append({"source": item.id, "class": item.class_name, "reason": result.reason,
                            "detail": result.detail})
            continue
        if dedup:
            kept = first_by_sha1.setdefault(result.sha1, item.id)
            if kept != item.id:
                duplicates += 1
                rejects.append({"source": item.id, "class": item.class_name, "reason": "duplicate",
                                "detail": f"same bytes as {kept}"})
                continue
        multi = [label_of[n] for n in item.labels] if listing.multi_label else None
        valid[item.id] = Entry(sample_key(item.id), item.id, item.path, item.offset, item.size,
                               label_of[item.class_name], item.class_name, result.sha1, result.width, result.height,
                               multi, list(item.labels) if listing.multi_label else None)
    keys = Counter(e.key for e in valid.values())
    clash = next((k for k, n in keys.items() if n > 1), None)
    if clash is not None:  # 96-bit hash: practically impossible, but a silent clash would merge two samples
        raise RuntimeError(f"sample key clash on {clash!r}; please report this")
    order = [valid[i] for i in shuffle_ids(list(valid), seed)]
    shards = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    rejects.sort(key=lambda r: r["source"])
    counts = {
        "listed": len(listing.inputs) + len(listing.rejects),
        "planned": len(order),
        "duplicates": duplicates,
        "non_image_files": sum(1 for r in listing.rejects if r.reason == "non_image_file"),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "unknown_labels_dropped": listing.unknown_labels_dropped,
    }
    return Plan(fingerprint, list(listing.classes), shards, rejects, counts, listing.multi_label)


def save_plan(plan: Plan, path: Path) -> None:
    """Atomic (temp + rename) so a killed driver never leaves half a plan behind."""
    payload = {"format": PLAN_FORMAT, "fingerprint": plan.fingerprint, "classes": plan.classes,
               "shards": [[e.to_list() for e in shard] for shard in plan.shards], "rejects": plan.rejects,
               "counts": plan.counts, "multi_label": plan.multi_label}
    with atomic_path(path) as tmp, gzip.GzipFile(tmp, "wb", mtime=0) as handle:
        handle.write(json.dumps(payload).encode("utf-8"))


def load_plan(path: Path) -> Plan | None:
    """The saved plan, or None when missing or unreadable (it is then rebuilt)."""
    try:
        with gzip.open(path, "rb") as handle:
            payload = json.loads(handle.read())
        if payload.get("format") != PLAN_FORMAT:
            return None
        shards = [[Entry(*row) for row in shard] for shard in payload["shards"]]
        return Plan(payload["fingerprint"], payload["classes"], shards, payload["rejects"], payload["counts"],
                    bool(payload.get("multi_label", False)))
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


# --- Partitioned planning (the driver never holds the listing or the plan) -------------------------------
#
# Every input is put into partition ``order_key[0]`` (the top 8 bits of sha256(seed, id)), so the partitions
# are consecutive ranges of the order: the global order (the old ``shuffle_ids``) is partition 0 sorted by
# key, then partition 1 sorted by key, ... . PARTITIONS therefore never changes the output; it only sets how
# much of the listing one step holds at a time (1/256 of it). Shard i covers the global positions
# [i*S, (i+1)*S) of the usable inputs: known ranges of known partitions, found from per-partition counts.

PARTITIONS = 256


def order_key(file_id: str, seed: int) -> bytes:
    """The sort key of ``shuffle_ids``; its first byte is the partition."""
    return hashlib.sha256(f"{seed}\0{file_id}".encode("utf-8")).digest()


def shard_ranges(usable: list[int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """Per shard, the (partition, first, stop) ranges -- positions among that partition's usable inputs in
    key order -- that make up global positions [i*S, (i+1)*S). O(partitions + shards) numbers."""
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_size
    for part, count in enumerate(usable):
        start = 0
        while start < count:
            take = min(room, count - start)
            current.append((part, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_size
    if current:
        shards.append(current)
    return shards


class SpillWriter:
    """Appends JSON rows to one file per partition (``<prefix>-PPP.jsonl``) without keeping them.

    One buffered handle per partition (256 file descriptors, 8 KiB of buffer each): memory stays flat however
    many rows pass through.
    """

    def __init__(self, directory: Path, prefix: str, partitions: int = PARTITIONS):
        self.directory, self.prefix = Path(directory), prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        self.handles: dict[int, object] = {}
        self.counts = [0] * partitions

    def path(self, part: int) -> Path:
        return self.directory / f"{self.prefix}-{part:03d}.jsonl"

    def add(self, part: int, row) -> None:
        self.add_line(part, json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    def add_line(self, part: int, line: str) -> None:
        """A row already written as one JSON line (ending in a newline): moved on without parsing it."""
        handle = self.handles.get(part)
        if handle is None:
            handle = self.handles[part] = open(self.path(part), "w", encoding="utf-8")
        handle.write(line)
        self.counts[part] += 1

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def read_spill(path: Path):
    """The rows of one spill file (none when the partition got no row)."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            yield json.loads(line)


# A partition holds N/256 rows: 62k at 16M inputs, 4M at 1B. Sorting one in memory would make the driver's
# peak grow with N (about 2 KB of Python objects per row), so a spill file with more than SORT_ROWS rows is
# first split again, by the next byte of the order key, into 256 sub-spills that are sorted one at a time
# (recursively, while one is still too big). Every row of a sub-spill shares the key bytes that chose it, so
# "sub-spill 0 sorted, sub-spill 1 sorted, ..." is still exactly the key order: the output does not depend on
# SORT_ROWS, only how much one sort holds does. Rows with equal keys (one manifest path listed twice) always
# land in the same sub-spill, so they stay next to each other.

SORT_ROWS = 10_000  # about 20 MB of parsed rows; from about 2.6M inputs on, every partition is split once
KEY_BYTES = 32  # sha256: past the last byte there is nothing left to split by (only equal keys remain)


def sorted_spill(path: Path, count: int, sort_key, limit: int | None = None, depth: int = 1):
    """The rows of one spill file, whose rows start with their order key in hex and share its first `depth`
    bytes, in ``sort_key`` order, never holding more than ``limit`` (default SORT_ROWS) rows at once.

    ``count``: its rows (``SpillWriter.counts``). Sub-spills go into a folder beside it and are deleted as
    they are read; the file itself is left to its owner.
    """
    limit = SORT_ROWS if limit is None else limit
    if count <= limit or depth >= KEY_BYTES:
        rows = list(read_spill(path))
        rows.sort(key=sort_key)
        yield from rows
        return
    sub = SpillWriter(path.parent / f"{path.name}.sub", "s")
    at = 2 + 2 * depth  # a line is '["<64 hex digits>",...': the key's next byte, read without parsing the row
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                sub.add_line(int(line[at:at + 2], 16), line)
        sub.close()
        for part in range(PARTITIONS):
            if sub.counts[part]:
                yield from sorted_spill(sub.path(part), sub.counts[part], sort_key, limit, depth + 1)
                sub.path(part).unlink()
    finally:
        sub.close()
        for part in range(PARTITIONS):
            sub.path(part).unlink(missing_ok=True)
        sub.directory.rmdir()


def external_sort(rows, key, directory: Path, limit: int | None = None):
    """``rows`` (JSON-able) in ``key`` order, stable, never holding more than ``limit`` (default SORT_ROWS) of
    them: sorted runs of that many go to files in ``directory`` and are merged lazily. A hand-written
    external merge sort because the listing's rows must not all be in memory; ``heapq.merge`` keeps equal
    keys in run order, so the result equals ``sorted(rows, key=key)``."""
    import heapq
    import itertools
    import tempfile

    limit = SORT_ROWS if limit is None else max(1, limit)
    rows = iter(rows)
    first = list(itertools.islice(rows, limit))
    nxt = list(itertools.islice(rows, 1))
    if not nxt:  # all fit: no file
        yield from sorted(first, key=key)
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sort-", dir=directory) as runs_dir:
        paths, run = [], first
        while run:
            run.sort(key=key)
            paths.append(Path(runs_dir) / f"run-{len(paths):06d}.jsonl")
            with open(paths[-1], "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in run)
            run = nxt + list(itertools.islice(rows, limit - len(nxt)))
            nxt = []
        yield from heapq.merge(*(read_spill(p) for p in paths), key=key)
