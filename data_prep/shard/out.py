"""OUT of a shard job: check it, refuse a foreign or different job's folder, lock a split, save and load the
plan, and say in one line how much space a full OUT needs."""
from __future__ import annotations

import fcntl
import gzip
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from core import storage
from core.errors import UserError
from core.storage import Location

from data_prep.shard.config import ShardConfig, log
from data_prep.shard.info import drop_split, load_info
from data_prep.shard.layout import INFO_NAME, STATE_DIR, plan_path, remove_stale_shard_temps, split_shards, state_dir
from data_prep.shard.tasks import file_sha256

PLAN_FORMAT = 2   # plan.json.gz: per-partition counts and the --dedup duplicates, never the entries
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _inside(out: Location, src: Location) -> bool:
    """OUT is SRC or below it (the shards would be listed as inputs)."""
    if storage.is_url(out) != storage.is_url(src):
        return False
    if storage.is_url(out):
        return str(out) == str(src) or str(out).startswith(str(src).rstrip("/") + "/")
    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    return Path(src).is_dir() and (out_path == src_path or src_path in out_path.parents)


def check_paths(cfg: ShardConfig) -> None:
    if not _SPLIT_NAME.match(cfg.split):
        raise UserError(f"--split {cfg.split!r}: use letters, digits and '_' only (it names files and keys)")
    if not storage.is_url(cfg.out) and cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"OUT {cfg.out} is a file; give a folder for the shards")
    storage.require_bucket(cfg.out)
    if _inside(cfg.out, cfg.src):
        raise UserError(f"OUT {cfg.out} is inside SRC {cfg.src}; the shards would be read as inputs, choose "
                        f"another OUT")


def _remove_split(out: Location, split: str) -> None:
    for path in split_shards(out, split):
        storage.remove(path)
    remove_stale_shard_temps(out, split)
    storage.remove_tree(state_dir(out, split))
    drop_split(out, split)


def _changed(old: dict, new: dict) -> str:
    keys = [*new, *(k for k in old if k not in new)]  # an option dropped (e.g. --exclude-near) is a change too
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs) if diffs else "the input files or the class list changed"


def _verify_complete(out: Location, entry: dict) -> bool:
    for shard in entry.get("shards", []):
        path = storage.join(out, shard["filename"])
        try:
            same = storage.size(path) == shard["bytes"] and file_sha256(path) == shard["sha256"]
        except FileNotFoundError:
            same = False
        if not same:
            log(f"shard {shard['filename']} is missing or damaged; rewriting what is needed")
            return False
    return True


def refuse_foreign_out(cfg: ShardConfig) -> None:
    """Never write into a non-empty folder (or prefix) that is not a shard folder (unless told to)."""
    out = cfg.out
    had_files = storage.has_entries(out)
    ours = storage.exists(storage.join(out, INFO_NAME)) or storage.exists(storage.join(out, STATE_DIR))
    if had_files and not ours and not cfg.overwrite:
        raise UserError(f"OUT {out} is not empty and holds no shards of ours (no {INFO_NAME}); choose an empty "
                        f"folder, or pass --overwrite to write into it anyway")


def prepare_out(cfg: ShardConfig, fingerprint: str, options: dict) -> bool:
    """Refuse a different job on an existing OUT; return True if this exact split is already complete."""
    out, split = cfg.out, cfg.split
    info = load_info(out)
    entry = info.get("splits", {}).get(split)
    saved = load_plan(out, split)
    if cfg.overwrite:
        _remove_split(out, split)
        return False
    what = f"OUT {out} already holds split {split!r}"
    if entry is not None and entry.get("fingerprint") != fingerprint:
        raise UserError(f"{what} made from other inputs or options ({_changed(entry.get('options', {}), options)}); "
                        f"pass --overwrite to replace it, or choose another OUT or --split")
    if saved is not None and saved["fingerprint"] != fingerprint:
        raise UserError(f"{what} from an unfinished job with other inputs or options "
                        f"({_changed(saved.get('options', {}), options)}); re-run that command to finish "
                        f"it, or pass --overwrite to replace it")
    if entry is None and saved is None and split_shards(out, split):
        raise UserError(f"{what} as {split}-*.tar files that {INFO_NAME} does not describe; pass --overwrite "
                        f"to replace them, or choose another OUT or --split")
    return entry is not None and saved is None and _verify_complete(out, entry)


def load_plan(out: Location, split: str) -> dict | None:
    """The saved plan (a dict of O(partitions) numbers), or None when missing, unreadable or of another format."""
    try:
        data = storage.read_bytes(plan_path(out, split))
        plan = json.loads(gzip.decompress(data))
    except (FileNotFoundError, OSError, ValueError, EOFError):
        return None
    return plan if isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT else None


def save_plan(plan: dict, out: Location, split: str) -> None:
    """Local: atomically into _state/. Object store: created only if absent (a conditional PUT): of two jobs
    that scanned the same split at once, the second stops here instead of writing beside the first."""
    path = plan_path(out, split)
    data = gzip.compress(json.dumps(plan).encode("utf-8"), mtime=0)
    if not storage.is_url(path):
        Path(state_dir(out, split)).mkdir(parents=True, exist_ok=True)
        storage.write_bytes(path, data)
        return
    try:
        storage.write_bytes(path, data, exclusive=True)
    except FileExistsError:
        raise UserError(f"another data_prep job is writing split {split!r} into {out} (its plan {path} appeared "
                        f"while this job scanned); wait for it to end. If no other job runs, delete "
                        f"{state_dir(out, split)} and re-run") from None


@contextmanager
def split_lock(out: Location, split: str):
    """One job per split of a local OUT (flock: released by the kernel when a job dies).

    An object store has no lock files, and a lock object left by a killed job would block its re-run. Its
    guards instead: the plan object is created with a conditional PUT (`save_plan`), so two jobs that start
    a split at once do not both write it; two runs of the *same* command (same plan) write the same bytes
    into whole objects and only waste work; and _info.json/rejects.jsonl are compare-and-swapped
    (data_prep.shard.info). Running two jobs on one split of an object store at once is the user's call.
    """
    if storage.is_url(out):
        yield
        return
    path = Path(out) / STATE_DIR / f"{split}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another data_prep job is writing split {split!r} into {out}; wait for it to end") \
                from None
        yield


def _shard_len(ranges) -> int:
    return sum(b - a for _p, a, b in ranges)


def space_message(out: Location, cause: str, plan: dict, shards: list, receipts: list) -> str:
    """One line: OUT is full, about how much more the shards not yet written need, and that a re-run resumes."""
    done = [i for i, r in enumerate(receipts) if r is not None]
    left = [i for i, r in enumerate(receipts) if r is None]
    samples_done = sum(_shard_len(shards[i]) for i in done)
    samples_left = sum(_shard_len(shards[i]) for i in left)
    if samples_done and sum(receipts[i]["bytes"] for i in done):
        per_sample = sum(receipts[i]["bytes"] for i in done) / samples_done
    else:  # nothing written yet: the inputs' mean size (re-encoded images are usually smaller)
        per_sample = plan.get("usable_bytes", 0) / max(1, sum(plan["usable"]))
    need = per_sample * samples_left
    if storage.is_url(out):  # the local temp folder where shards wait for their upload ran out of space
        where = tempfile.gettempdir()
        return (f"the temp folder {where} (TMPDIR), where each shard is written before its upload to OUT {out}, is "
                f"full ({cause}); shards are about {need / max(1, len(left)) / 1e6:,.1f} MB each; point TMPDIR at "
                f"a bigger disk and re-run the same command: the {len(done)} finished shards are kept")
    free = shutil.disk_usage(out).free
    return (f"OUT {out} is full ({cause}): about {need / 1e6:,.1f} MB more are needed for the {len(left)} shards "
            f"not yet written ({free / 1e6:,.1f} MB free now); free space there and re-run the same command: the "
            f"{len(done)} finished shards are kept")


def space_error(out: Location, err: OSError) -> UserError:
    return UserError(f"OUT {out} is full ({err.strerror or err}{f': {err.filename}' if err.filename else ''}); "
                     f"free space there and re-run the same command: finished shards are kept")
