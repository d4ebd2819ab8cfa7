"""Where things live in OUT, and the small atomic-write helpers every writer uses.

    OUT/{split}-000000.tar            shards (final names appear only once complete)
    OUT/.{split}-000000.tar.<uuid>.tmp  a shard being written (removed on the next run if left behind)
    OUT/_info.json                    timm-readable description of every split
    OUT/rejects.jsonl                 one line per skipped file, every split
    OUT/_state/{split}/plan.json.gz   the plan of a running job (deleted when the split is complete)
    OUT/_state/{split}/receipts/{split}-000000.json   written after its shard was renamed into place
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

INFO_NAME = "_info.json"
REJECTS_NAME = "rejects.jsonl"
STATE_DIR = "_state"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def temp_path(out: Path, final_name: str) -> Path:
    """Unique per attempt: a retried task never writes into the file of a task it replaced."""
    return out / f".{final_name}.{uuid.uuid4().hex}.tmp"


def state_dir(out: Path, split: str) -> Path:
    return out / STATE_DIR / split


def plan_path(out: Path, split: str) -> Path:
    return state_dir(out, split) / "plan.json.gz"


def receipt_path(out: Path, split: str, filename: str) -> Path:
    return state_dir(out, split) / "receipts" / f"{Path(filename).stem}.json"


def fsync_dir(path: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.name)
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_path(path.parent, path.name)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    """Parsed JSON, or None when the file does not exist or is damaged."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
