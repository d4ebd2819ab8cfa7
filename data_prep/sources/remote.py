"""Files of a local folder or an object-store prefix, through one fsspec code path (``file://`` tests exercise
what ``s3://`` runs): list them, walk an ImageFolder tree one class folder at a time, open or range-read one.

SRC is a folder or object-store prefix (``s3://bucket/prefix``; any fsspec URL), one file, or a glob pattern in
its last part (``shards/train-*.tar``): the files directly inside, sorted by name, hidden ones skipped. A str
holding "://" is a URL; everything else is a local path.
"""
from __future__ import annotations

import datetime
import itertools
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from core.errors import UserError

_GLOB = re.compile(r"[*?\[]")
_LIST_THREADS = 16              # object stores: files listed concurrently (each listing waits on the network)
_TAR_BLOCK = 8 << 20            # ranged GET size when walking a remote tar's headers


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location


def has_glob(location) -> bool:
    return bool(_GLOB.search(str(location).rstrip("/").rsplit("/", 1)[-1]))


def filesystem(location: str):
    """(fsspec filesystem, path in it) of a URL or local path; a missing backend (s3fs) is one line."""
    import fsspec

    try:
        # No listing cache: s3fs keeps every listing it made (dircache, unbounded, for the process's life), so
        # walking a 14M-object tree folder by folder would still end up holding all 14M entries.
        return fsspec.core.url_to_fs(location, use_listings_cache=False)
    except ImportError as err:
        raise UserError(f"SRC {location}: reading this URL needs a package that is not installed ({err})") from None
    except ValueError as err:
        raise UserError(f"SRC {location}: {err}") from None


def first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _mtime(info: dict) -> int:
    """A file's modification time in ns from fsspec's info (local mtime, S3 LastModified, memory created)."""
    value = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1_000_000) * 1000
    if isinstance(value, (int, float)):
        return int(value * 1_000_000) * 1000
    return 0


@dataclass(frozen=True)
class PackedFile:
    name: str      # relative to SRC's folder or prefix: the first part of every sample id
    location: str  # what read_bytes opens: a local path, or a URL with its scheme
    size: int
    mtime: int     # ns; every sample of the file carries it, so a rewritten file changes the fingerprint


def list_files(src, suffix: str) -> tuple[str, list[PackedFile]]:
    """(folder or prefix, files) of SRC: a folder/prefix, one file, or a pattern; only names ending in suffix."""
    text = str(src)
    fs, path = filesystem(text)
    url = is_url(text)
    try:
        if has_glob(path):
            base = path.rstrip("/").rsplit("/", 1)[0]
            infos = list(fs.glob(path, detail=True).values())
        elif fs.isdir(path):
            base = path.rstrip("/")
            infos = fs.ls(path, detail=True)
        elif fs.isfile(path):
            base = path.rsplit("/", 1)[0]
            infos = [fs.info(path)]
        else:
            raise UserError(f"SRC {text} does not exist")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types here; all mean "cannot list"
        raise UserError(f"SRC {text}: cannot list it ({first_line(err)}); check the path, the credentials "
                        f"(AWS_* variables for s3://) and the endpoint") from None
    files = []
    for info in infos:
        name = info["name"].rstrip("/")
        rel = name[len(base):].lstrip("/") if name.startswith(base) else name.rsplit("/", 1)[-1]
        leaf = rel.rsplit("/", 1)[-1]
        if info.get("type") == "file" and leaf.lower().endswith(suffix) and not leaf.startswith("."):
            files.append(PackedFile(rel, fs.unstrip_protocol(name) if url else name, int(info.get("size") or 0),
                                    _mtime(info)))
    return (fs.unstrip_protocol(base) if url else base), sorted(files, key=lambda f: f.name)


def walk_files(src) -> tuple[str, list[PackedFile]]:
    """(folder or prefix, every file below it, hidden ones too): an ImageFolder tree in object storage."""
    text = str(src)
    fs, path = filesystem(text)
    base = path.rstrip("/")
    try:
        infos = list(fs.find(base, detail=True).values())
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types here; all mean "cannot list"
        raise UserError(f"SRC {text}: cannot list it ({first_line(err)}); check the path, the credentials "
                        f"(AWS_* variables for s3://) and the endpoint") from None
    files = [PackedFile(info["name"][len(base):].lstrip("/"), fs.unstrip_protocol(info["name"]),
                        int(info.get("size") or 0), _mtime(info))
             for info in infos if info.get("type") == "file" and info["name"].startswith(base + "/")]
    return fs.unstrip_protocol(base), sorted(files, key=lambda f: f.name)


def walk_class_folders(src):
    """(folder name or None, its files) of an ImageFolder tree under an object-store prefix: first (None, the
    files directly in it), then each sub-folder's files (names relative to the prefix), sorted, listed one
    folder at a time on threads: ImageNet-21K's 14M objects are never held at once."""
    text = str(src)
    fs, path = filesystem(text)
    base = path.rstrip("/")
    try:
        infos = fs.ls(base, detail=True)
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types here; all mean "cannot list"
        raise UserError(f"SRC {text}: cannot list it ({first_line(err)}); check the path, the credentials "
                        f"(AWS_* variables for s3://) and the endpoint") from None
    def leaf(info: dict) -> str:
        return info["name"].rstrip("/").rsplit("/", 1)[-1]

    folders = sorted(leaf(i) for i in infos if i.get("type") == "directory")
    yield None, sorted((PackedFile(leaf(i), fs.unstrip_protocol(i["name"]), int(i.get("size") or 0), _mtime(i))
                        for i in infos if i.get("type") == "file"), key=lambda f: f.name)
    prefix = fs.unstrip_protocol(base)
    listed = iter_files(lambda folder: walk_files(f"{prefix}/{folder}")[1], folders, url=True)
    for folder, files in zip(folders, listed):
        yield folder, [PackedFile(f"{folder}/{f.name}", f.location, f.size, f.mtime) for f in files]


def open_location(location: str, block_size: int = _TAR_BLOCK):
    """A local file, or a URL read front to back in ranged GETs of `block_size` with read-ahead."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(location)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def read_range(location: str, offset: int, size: int) -> bytes:
    """At most `size` bytes of a whole object (offset < 0: from its start) or `size` bytes at `offset` of a
    URL: one ranged GET, no local copy, never more than asked for."""
    fs, path = filesystem(location)
    start = max(offset, 0)
    return fs.cat_file(path, start=start, end=start + size)


def iter_files(fn, files: list[PackedFile], url: bool):
    """fn(file) for every file, in order, as they finish. Object stores: _LIST_THREADS at once (each waits on
    the network), at most 2 x _LIST_THREADS files ahead of the consumer (a listing of 100,000 files streams)."""
    if not url or len(files) < 2:
        yield from map(fn, files)
        return
    pool = ThreadPoolExecutor(max_workers=min(_LIST_THREADS, len(files)))
    try:
        queue = iter(files)
        ahead = deque(pool.submit(fn, f) for f in itertools.islice(queue, 2 * _LIST_THREADS))
        while ahead:
            result = ahead.popleft().result()
            following = next(queue, None)
            if following is not None:
                ahead.append(pool.submit(fn, following))
            yield result
    finally:  # an error or an abandoned listing: drop the queued files, do not wait for them
        pool.shutdown(wait=False, cancel_futures=True)
