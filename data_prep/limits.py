"""Limits on what one hostile input can make a shard job read or hold, with their defaults.

Every limit is checked before the bytes are read where the size is known first (stat, tar header, object
size, parquet metadata); a row or member over a limit becomes a reject with a reason, never a stop. Only
``max_classes`` is a property of the whole source: above it the job stops with one line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from data_prep.images import MAX_BYTES, MAX_ROW_GROUP_BYTES

MAX_JSON_DEPTH = 64  # nesting of a JSON label value (a manifest row, a .json member); deeper is a reject


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_BYTES              # bytes of one image: file, tar member, object or parquet cell
    max_label_bytes: int = 64 << 10         # a label: manifest row, .json/.cls/.txt member, parquet label cell
    max_labels: int = 1024                  # labels per image
    max_classes: int = 200_000              # classes of the source (JFT-300M: 18k, ImageNet-21K: 21,841)
    max_row_group_bytes: int = MAX_ROW_GROUP_BYTES  # uncompressed image column of one parquet row group

    def fingerprint_options(self) -> dict:
        """The limits that are not at their default (those change which rows are rejected)."""
        default = asdict(Limits())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


def json_depth(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when a parsed JSON value nests no deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def loads_label(text, limit_bytes: int):
    """json.loads of a small label document: (value, None) or (None, (reason, detail)).

    json.loads recurses per nesting level, so a label nested 100k deep raises RecursionError; the brackets are
    counted first (a cheap bound: a string holding brackets only makes the count larger) and a deep document
    is a reject before it is parsed."""
    import json

    if len(text) > limit_bytes:
        return None, ("label_too_large", f"label is {len(text):,} bytes > --max-label-bytes {limit_bytes:,}")
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    depth = peak = 0
    for ch in raw:
        if ch in "[{":
            depth += 1
            peak = max(peak, depth)
        elif ch in "]}":
            depth -= 1
    if peak > MAX_JSON_DEPTH:
        return None, ("bad_label", f"JSON nested {peak} deep (more than {MAX_JSON_DEPTH})")
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError) as err:
        return None, ("bad_label", f"invalid JSON ({str(err)[:100]})")


def bad_name(name: str) -> str | None:
    """Why a file or member name cannot be an id (None when it can): every id is written to UTF-8 JSON."""
    if "\0" in name:
        return "name holds a NUL byte"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    return None


def printable(name: str) -> str:
    """A name as it can be written to rejects.jsonl: undecodable bytes as \\xNN, NUL as \\x00."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # a file name's undecodable bytes, as they were
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")  # a lone surrogate from JSON ("\ud800")
    return raw.decode("utf-8", "backslashreplace").replace("\0", "\\x00")


class Rejected(NamedTuple):
    """A listed row judged bad by its lister (a hostile name, row or label): it goes to rejects.jsonl."""

    id: str
    class_name: str | None
    reason: str
    detail: str


def rejected(name: str, reason: str, detail: str, class_name: str | None = None) -> Rejected:
    return Rejected(printable(name), class_name, reason, detail)
