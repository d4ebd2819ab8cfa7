"""What makes a checkpoint trustworthy after the fact: per-file sizes and checksums, and a save that fails cleanly.

A checkpoint marked complete can still be damaged later (a file deleted, truncated by a full disk on copy, a
flipped bit on a bad disk). Each rank records the size and checksum of the files it wrote in a save (DeepSpeed
writes every file through `engine.checkpoint_engine.save`, which `record_writes` watches); rank 0 gathers them
into `complete.json`. Resume checks them, each rank its own share, and falls back to the previous complete
checkpoint naming the damaged file.

Checksum: sha256 (0.77 s per GB on one core here with the CPU's SHA instructions; crc32 0.44 s/GB): it catches
truncation, lost blocks and flipped bits, and, because the marker is signed (pipeline.checkpoint.trust), a file
swapped for another. Markers written before it record crc32 or xxh3_64, which are still checked for damage.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from typing import Optional

try:
    import xxhash
except ImportError:  # not a dependency; read only for markers written when it was the checksum
    xxhash = None

ALGORITHM = "sha256"
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_BLOCK = 8 << 20


def file_checksum(path: str, algorithm: str = ALGORITHM) -> Optional[str]:
    """Hex checksum of a file, or None when `algorithm` is not available here."""
    if algorithm == "sha256":
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()
    if algorithm == "xxh3_64" and xxhash is not None:
        digest = xxhash.xxh3_64()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()
    if algorithm != "crc32":
        return None
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


@contextmanager
def record_writes(engine):
    """Collect the paths this rank's DeepSpeed engine writes while the block runs."""
    written: list[str] = []
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.save

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        written.append(os.path.abspath(path))
        return result

    ckpt_engine.save = save
    try:
        yield written
    finally:
        ckpt_engine.save = original


def describe_files(tag_dir: str, paths: list[str], rank: int) -> dict:
    """{path relative to the tag folder: {bytes, checksum, rank}} of the files under `tag_dir` in `paths`."""
    root = os.path.abspath(tag_dir)
    out = {}
    for path in paths:
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            continue
        out[rel] = {"bytes": os.path.getsize(path), "checksum": file_checksum(path), "rank": rank}
    return out


def merge_files(tag_dir: str, per_rank: list[dict], skip: tuple[str, ...]) -> dict:
    """Every rank's records in one dict, plus any file under `tag_dir` no rank claimed (rank 0 hashes it)."""
    files: dict = {}
    for records in per_rank:
        files.update(records)
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), tag_dir)
            if rel not in files and name not in skip and not name.startswith("."):
                files.update(describe_files(tag_dir, [os.path.join(folder, name)], 0))
    return dict(sorted(files.items()))


def verify_share(tag_dir: str, meta: dict, rank: int, world_size: int) -> list[str]:
    """Problems ('FILE: missing' ...) among this rank's share of the files `meta` records: the files it wrote
    when the world size is unchanged (its page cache may still hold them), else every world_size-th file."""
    files = meta.get("files")
    if not isinstance(files, dict):  # written before checksums were recorded: nothing to check
        return []
    same_world = int(meta.get("world_size", -1)) == world_size
    algorithm = meta.get("checksum", "crc32")
    problems = []
    for index, (rel, record) in enumerate(sorted(files.items())):
        owner = int(record.get("rank", 0)) if same_world else index
        if owner % world_size != rank:
            continue
        path = os.path.join(tag_dir, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if size != record["bytes"]:
            problems.append(f"{path}: {size} bytes, {record['bytes']} when saved (truncated or replaced)")
            continue
        checksum = file_checksum(path, algorithm)
        if checksum is not None and checksum != record["checksum"]:
            problems.append(f"{path}: {algorithm} {checksum}, {record['checksum']} when saved (altered)")
    return problems


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError for a failed write (it does not keep the errno)."""
    if isinstance(err, OSError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("write" in text or "unexpected pos" in text or "space" in text)


def free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: Optional[float]) -> str:
    return "unknown" if n is None else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.1f} GB"


def space_message(ckpt_dir: str, tag: str, cause: str, need: Optional[int], newest: Optional[str]) -> str:
    """The one line a save that cannot fit ends the run with: what failed, what to free, what is intact."""
    free = free_bytes(ckpt_dir)
    size = f"a checkpoint takes about {_mb(need)}" if need else "a checkpoint takes about 16 bytes per parameter"
    intact = (f"{newest} and older checkpoints are intact and the same command resumes from {newest}"
              if newest else "no earlier checkpoint exists; the same command starts again")
    return (f"checkpoint {tag} cannot be saved in {ckpt_dir} ({cause}): free space there ({size}, "
            f"{_mb(free)} free now), then relaunch; {intact}")


def exit_save_failed(message: str, code: int = 2) -> None:
    """Print the save failure as the one-line `error:` and leave at once: the other ranks may be waiting in a
    collective this rank will never join (the launcher ends them), and no clean-up may touch the checkpoints."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(code)
