"""Spill files: rows streamed to one JSON-lines file per order partition, sorted a piece at a time.

Shared by the listing (``sources.listing``) and the planning driver (``shard.job``); it imports neither, so
neither depends on the other through it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
