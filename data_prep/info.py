"""OUT/_info.json and OUT/rejects.jsonl: read, merge one split in, write atomically.

_info.json follows timm's webdataset reader (``splits.<split>.name/num_samples/filenames/shard_lengths``)
and adds per-shard bytes/sha256, the class list, the options, the input fingerprint, counts and versions.
Several splits share one OUT: writing a split replaces only its own entry and its own rejects lines, under
a file lock so two jobs writing different splits do not lose each other's entries.
"""
from __future__ import annotations

import fcntl
import json
import platform
from contextlib import contextmanager
from pathlib import Path

from core.errors import UserError
from core.files import atomic_write_json, atomic_write_text

from .layout import INFO_NAME, REJECTS_NAME, STATE_DIR, read_json

INFO_FORMAT = 1


def versions() -> dict[str, str]:
    """What produced the bytes: the same versions and options give the same shards."""
    from importlib.metadata import PackageNotFoundError, version

    from PIL import features

    def installed(name: str) -> str:
        try:
            return version(name)  # metadata only: importing webdataset would import torch
        except PackageNotFoundError:
            return "not installed"

    return {"data_prep_format": str(INFO_FORMAT), "python": platform.python_version(),
            "pillow": installed("pillow"), "libjpeg": str(features.version("jpg")),
            "libjpeg_turbo": str(features.check_feature("libjpeg_turbo")), "numpy": installed("numpy"),
            "ray": installed("ray"), "webdataset": installed("webdataset"),
            "coatnet-pipeline": installed("coatnet-pipeline")}


def load_info(out: Path) -> dict:
    """The current _info.json ({} when absent); a damaged one is a user-visible error, never overwritten."""
    path = out / INFO_NAME
    if not path.exists():
        return {}
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
        raise UserError(f"{path} is not a valid shard description; fix or delete it (other splits are listed there)")
    return info


@contextmanager
def info_lock(out: Path):
    lock_path = out / STATE_DIR / "info.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_split(out: Path, split: str, entry: dict | None, rejects: list[dict]) -> None:
    """Put one split's entry into _info.json and its rejects into rejects.jsonl (other splits kept).

    entry None writes the rejects only (a job that found no usable image describes no split).
    """
    with info_lock(out):
        if entry is not None:
            info = load_info(out)
            splits = dict(info.get("splits", {}))
            splits[split] = entry
            info = {"splits": dict(sorted(splits.items())), "classes": entry["classes"], "versions": versions()}
            atomic_write_json(out / INFO_NAME, info, indent=1)
        kept = []
        path = out / REJECTS_NAME
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("split") != split:
                    kept.append(line)
        lines = kept + [json.dumps({"split": split, **r}, ensure_ascii=False, sort_keys=True) for r in rejects]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def drop_split(out: Path, split: str) -> None:
    """Forget a split (--overwrite): its _info.json entry and rejects lines."""
    with info_lock(out):
        info = load_info(out)
        if split in info.get("splits", {}):
            info["splits"] = {k: v for k, v in info["splits"].items() if k != split}
            atomic_write_json(out / INFO_NAME, info, indent=1)
        path = out / REJECTS_NAME
        if path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                     if _split_of(line) != split]
            atomic_write_text(path, "".join(line + "\n" for line in lines))


def _split_of(line: str):
    try:
        return json.loads(line).get("split")
    except ValueError:
        return None
