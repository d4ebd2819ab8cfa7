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
