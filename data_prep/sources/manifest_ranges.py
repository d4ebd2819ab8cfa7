"""A CSV/JSONL manifest cut into byte ranges that start at line starts, so that Ray tasks can list a manifest of
billions of lines in parts (``sources.parts``) and a requeued job re-lists only the ranges it had not finished.

The cuts are a function of the file alone (every ``PART_BYTES``, moved forward to the next line start; for CSV
never inside the header line), so a rerun makes the same parts. A cut after a ``\\n`` is a line end in every
reading the one-process lister does (universal newlines, UTF-8: ``\\n`` is never inside a character), so the
ranges' lines, in range order, are the file's lines. Only a CSV field quoted across a line break can span a
cut: ``EndMark`` lets the range's reader see that, and the listing stops with one line (``sources.parts``).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

PART_BYTES = 64 << 20  # ~800k lines of a typical manifest: a task's stats take seconds to minutes


@dataclass(frozen=True)
class ManifestRange:
    """One part of a manifest: bytes [start, end). name, location, size and mtime make its fingerprint."""

    name: str       # "<manifest>@<start>-<end>": names its result files in OUT
    location: str
    size: int       # the manifest's size and mtime: a changed manifest is listed again
    mtime: int
    start: int
    end: int


def _line_start(handle, at: int, size: int) -> int:
    """The first line start at or after `at` (`size` when none): the byte after the first \\n from at - 1."""
    if at <= 0:
        return 0
    handle.seek(at - 1)
    pos = at - 1
    while True:  # read in pieces: a hostile line of gigabytes is read once, never held
        chunk = handle.read(1 << 16)
        if not chunk:
            return size
        found = chunk.find(b"\n")
        if found >= 0:
            return pos + found + 1
        pos += len(chunk)


def plan_ranges(path: Path, is_csv: bool, part_bytes: int | None = None) -> list[ManifestRange]:
    """The ranges of a manifest, in file order; the first holds a CSV's header line."""
    part_bytes = part_bytes or PART_BYTES
    info = os.stat(path)
    size, starts = info.st_size, [0]
    with open(path, "rb") as handle:
        floor = _line_start(handle, 1, size) + 1 if is_csv else 1  # a CSV's first cut: after its header line
        for nominal in range(part_bytes, size, part_bytes):
            start = _line_start(handle, max(nominal, floor), size)
            if start >= size:
                break
            if start > starts[-1]:
                starts.append(start)
    ends = [*starts[1:], size]
    return [ManifestRange(f"{path.name}@{s}-{e}", str(path), size, info.st_mtime_ns, s, e)
            for s, e in zip(starts, ends)]


class _Window(io.RawIOBase):
    """The bytes of a file up to `end`, from where it is: the text layer above sees the range's end as EOF."""

    def __init__(self, raw, end: int):
        super().__init__()
        self.raw, self.left = raw, end - raw.tell()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.raw.readinto(memoryview(buffer)[:n])
        self.left -= got
        return got

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_range(path: Path, span: ManifestRange):
    """The text of one range, read as the one-process lister reads the file (a BOM only at its start)."""
    raw = open(path, "rb", buffering=0)
    raw.seek(span.start)
    return io.TextIOWrapper(io.BufferedReader(_Window(raw, span.end), 1 << 20),
                            encoding="utf-8-sig" if span.start == 0 else "utf-8", errors="surrogateescape",
                            newline="")


class EndMark:
    """A range's lines, then one mark line. A CSV reader inside a quoted field at the range's end takes the mark
    into that field; otherwise the mark is a row of its own (``is_mark``), which ends the range."""

    MARK = "\ufdd0data_prep: end of range\ufdd0"

    def __init__(self, lines):
        self.lines, self.reached = lines, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.reached:
            raise StopIteration
        try:
            return next(self.lines)
        except StopIteration:
            self.reached = True
            return self.MARK + "\n"

    def is_mark(self, row: dict, fields: list[str]) -> bool:
        return row.get(fields[0]) == self.MARK and all(row.get(f) is None for f in fields[1:]) \
            and None not in row
