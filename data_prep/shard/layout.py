"""Where things live in OUT. Writes go through core.storage: on a local OUT temp beside the target, fsync,
rename (core.files); on an object store (``s3://bucket/prefix``) whole-object PUTs, so there are no temp names.

    OUT/{split}-000000.tar              shards (final names appear only once complete)
    OUT/.{split}-000000.tar.tmp.<pid>   a shard being written (removed on the next run if left behind)
    OUT/_info.json                      timm-readable description of every split
    OUT/rejects.jsonl                   one line per skipped file, every split
    OUT/_state/{split}/plan.json.gz     the plan of a running job (deleted when the split is complete)
    OUT/_state/{split}/receipts/{split}-000000.json   written after its shard was renamed into place
    OUT/_state/{split}/scan/PPP.jsonl.gz   scan results of order partition PPP (sorted by order key)
    OUT/_state/{split}/scan/PPP.json       its receipt (fingerprint, counts, scan rejects), written after it
    OUT/_state/{split}/inputs/PPP.jsonl    the listed inputs of partition PPP, read by its scan task

The listing itself is spilled to a local temp folder (TMPDIR, ``data_prep-list-*``; --dedup's pairs to
``data_prep-dedup-*``) while the job runs, and the next job on the host removes those of killed jobs
(core.files.owned_temp_dir); each partition still to scan is copied to OUT/_state/<split>/inputs/ (streamed,
so the driver holds none of it) and its scan task reads it from there. inputs/ and scan/ are deleted when the
split is complete.
"""
from __future__ import annotations

from pathlib import Path

from core import storage
from core.files import stale_temps
from core.storage import Location

INFO_NAME = "_info.json"
REJECTS_NAME = "rejects.jsonl"
STATE_DIR = "_state"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_shards(out: Location, split: str) -> list[Location]:
    """The finished shards of a split in OUT (temp files start with a dot and never match)."""
    return [storage.join(out, name) for name in storage.listdir(out, f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")]


def remove_stale_shard_temps(out: Location, split: str) -> None:
    """Delete the temp files of shard writers that were killed (never a complete shard).

    An object store has none: a shard object appears whole or not at all. A multipart upload cut short by a
    kill stays invisible (and unbilled once the bucket's AbortIncompleteMultipartUpload lifecycle rule runs).
    """
    if storage.is_url(out):
        return
    out = Path(out)
    legacy = out.glob(f".{split}-*.tmp")  # the naming of data_prep before core.files
    for stale in [*stale_temps(out, f"{split}-*.tar"), *legacy]:
        stale.unlink(missing_ok=True)


def state_dir(out: Location, split: str) -> Location:
    return storage.join(out, STATE_DIR, split)


def plan_path(out: Location, split: str) -> Location:
    return storage.join(state_dir(out, split), "plan.json.gz")


def scan_path(out: Location, split: str, part: int) -> Location:
    return storage.join(state_dir(out, split), "scan", f"{part:03d}.jsonl.gz")


def inputs_path(out: Location, split: str, part: int) -> Location:
    return storage.join(state_dir(out, split), "inputs", f"{part:03d}.jsonl")


def scan_receipt_path(out: Location, split: str, part: int) -> Location:
    return storage.join(state_dir(out, split), "scan", f"{part:03d}.json")


def receipt_path(out: Location, split: str, filename: str) -> Location:
    return storage.join(state_dir(out, split), "receipts", f"{Path(filename).stem}.json")


def read_json(path: Location):
    """Parsed JSON, or None when the file or object does not exist or is damaged."""
    return storage.read_json(path)
