"""Where things live in OUT. Writes go through core.files (temp beside the target, fsync, rename).

    OUT/{split}-000000.tar              shards (final names appear only once complete)
    OUT/.{split}-000000.tar.tmp.<pid>   a shard being written (removed on the next run if left behind)
    OUT/_info.json                      timm-readable description of every split
    OUT/rejects.jsonl                   one line per skipped file, every split
    OUT/_state/{split}/plan.json.gz     the plan of a running job (deleted when the split is complete)
    OUT/_state/{split}/receipts/{split}-000000.json   written after its shard was renamed into place
"""
from __future__ import annotations

import json
from pathlib import Path

from core.files import stale_temps

INFO_NAME = "_info.json"
REJECTS_NAME = "rejects.jsonl"
STATE_DIR = "_state"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_shards(out: Path, split: str) -> list[Path]:
    """The finished shards of a split on disk (temp files start with a dot and never match)."""
    return sorted(out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def remove_stale_shard_temps(out: Path, split: str) -> None:
    """Delete the temp files of shard writers that were killed (never a complete shard)."""
    legacy = out.glob(f".{split}-*.tmp")  # the naming of data_prep before core.files
    for stale in [*stale_temps(out, f"{split}-*.tar"), *legacy]:
        stale.unlink(missing_ok=True)


def state_dir(out: Path, split: str) -> Path:
    return out / STATE_DIR / split


def plan_path(out: Path, split: str) -> Path:
    return state_dir(out, split) / "plan.json.gz"


def receipt_path(out: Path, split: str, filename: str) -> Path:
    return state_dir(out, split) / "receipts" / f"{Path(filename).stem}.json"


def read_json(path: Path):
    """Parsed JSON, or None when the file does not exist or is damaged."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
