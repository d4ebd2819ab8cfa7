"""OUT/_info.json and OUT/rejects.jsonl: read, merge one split in, write atomically.

_info.json follows timm's webdataset reader (``splits.<split>.name/num_samples/filenames/shard_lengths``)
and adds per-shard bytes/sha256, the class list, the options, the input fingerprint, counts and versions.
Several splits share one OUT: writing a split replaces only its own entry and its own rejects lines, under
a file lock (local OUT) or a compare-and-swap (object store) so two jobs writing different splits do not lose
each other's entries.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from core import storage
from core.errors import UserError
from core.files import atomic_path, atomic_write_bytes
from core.storage import Location

from data_prep.shard.layout import INFO_NAME, REJECTS_NAME, STATE_DIR

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


def load_info(out: Location) -> dict:
    """The current _info.json ({} when absent); a damaged one is a user-visible error, never overwritten."""
    return _parse_info(storage.join(out, INFO_NAME), None if not storage.exists(storage.join(out, INFO_NAME))
                       else storage.read_bytes(storage.join(out, INFO_NAME)))


def _parse_info(path: Location, data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
        raise UserError(f"{path} is not a valid shard description; fix or delete it (other splits are listed there)")
    return info


@contextmanager
def info_lock(out: Path):
    lock_path = out / STATE_DIR / "info.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # Not through a link someone planted, and not truncating: the lock file's content is never used.
    with os.fdopen(os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _update(out: Location, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
    """Replace OUT/name by change(its bytes or None); None leaves it as it is.

    Several jobs (one per split) may do this at once. Local: under a file lock, written atomically. Object
    store: a compare-and-swap on the object's ETag (core.storage.update_object) -- there is no lock file that
    a killed job could leave behind, and a concurrent change is read again, never lost.
    """
    path = storage.join(out, name)
    if storage.is_url(out):
        def cas(old: bytes | None) -> bytes:
            new = change(old)
            return old if new is None else new  # rewriting the same bytes is harmless
        storage.update_object(str(path), cas)
        return
    with info_lock(Path(out)):
        new = change(path.read_bytes() if path.exists() else None)
        if new is not None:
            atomic_write_bytes(path, new)


def _info_bytes(info: dict) -> bytes:
    return (json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _rejects_bytes(old: bytes | None, split: str, rejects: list[dict]) -> bytes:
    """rejects.jsonl with this split's lines replaced by `rejects` (other splits' lines kept in order)."""
    kept = [line for line in (old or b"").decode("utf-8").splitlines() if _split_of(line) not in (split, _BAD)]
    lines = kept + [json.dumps({"split": split, **r}, ensure_ascii=False, sort_keys=True) for r in rejects]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def merge_split(out: Location, split: str, entry: dict | None, rejects: Iterable[dict]) -> None:
    """Put one split's entry into _info.json and its rejects into rejects.jsonl (other splits kept).

    entry None writes the rejects only (a job that found no usable image describes no split).
    """
    path = storage.join(out, INFO_NAME)
    if entry is not None:
        def put(old: bytes | None) -> bytes:
            splits = dict(_parse_info(path, old).get("splits", {}))
            splits[split] = entry
            return _info_bytes({"splits": dict(sorted(splits.items())), "classes": entry["classes"],
                                "versions": versions()})
        _update(out, INFO_NAME, put)
    if storage.is_url(out):  # a compare-and-swap may call change() again: the rejects must be re-iterable
        rejects = rejects if isinstance(rejects, list) else list(rejects)
        _update(out, REJECTS_NAME, lambda old: _rejects_bytes(old, split, rejects))
        return
    with info_lock(Path(out)):
        _stream_rejects(Path(out) / REJECTS_NAME, split, rejects)


def _stream_rejects(path: Path, split: str, rejects: Iterable[dict]) -> None:
    """`_rejects_bytes` for a local OUT, line by line into a temp file renamed over rejects.jsonl: neither the
    other splits' lines nor this split's rejects are held (a split may have millions)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        if path.exists():
            with open(path, "rb") as old:
                for raw in old:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if _split_of(line) not in (split, _BAD):
                        handle.write((line + "\n").encode("utf-8"))
        for r in rejects:
            handle.write((json.dumps({"split": split, **r}, ensure_ascii=False, sort_keys=True) + "\n")
                         .encode("utf-8"))


def drop_split(out: Location, split: str) -> None:
    """Forget a split (--overwrite): its _info.json entry and rejects lines."""
    path = storage.join(out, INFO_NAME)

    def drop(old: bytes | None) -> bytes | None:
        info = _parse_info(path, old)
        if split not in info.get("splits", {}):
            return None
        info["splits"] = {k: v for k, v in info["splits"].items() if k != split}
        return _info_bytes(info)

    _update(out, INFO_NAME, drop)
    _update(out, REJECTS_NAME, lambda old: None if old is None else _rejects_bytes(old, split, []))


_BAD = object()  # the split of a line that is not JSON: such lines are dropped, as before


def _split_of(line: str):
    try:
        return json.loads(line).get("split")
    except ValueError:
        return _BAD
