"""Read the bytes at one input address (``listing.InputFile``): a plain file, a tar member or a parquet row,
local or in object storage, never more than the byte limit. Kept apart from ``images`` (pure functions of
bytes) so that module imports no source reader."""
from __future__ import annotations

import os
import stat

from data_prep.images import MAX_BYTES, MAX_ROW_GROUP_BYTES, PARQUET_ROW, ImageRejected
from data_prep.sources.parquet import read_parquet_image  # pyarrow is imported inside it, only when used
from data_prep.sources.remote import read_range


def too_large(size: int, max_bytes: int) -> ImageRejected:
    return ImageRejected("too_large", f"{size:,} bytes > --max-bytes {max_bytes:,}")


def _read_local(path: str, offset: int, size: int, max_bytes: int) -> bytes:
    """A regular file only: O_NONBLOCK so that opening a FIFO does not wait for a writer, then fstat decides
    (a FIFO, a device such as /dev/zero behind a symlink, a socket are rejects, never read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_a_file", "not a regular file (a FIFO, device, socket or folder)")
        whole = info.st_size if offset < 0 else size
        if whole > max_bytes:
            raise too_large(whole, max_bytes)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            if offset >= 0:
                handle.seek(offset)
            data = handle.read(whole + 1 if offset < 0 else size)  # a file that grew past its stat is caught
    finally:
        if fd >= 0:
            os.close(fd)
    if offset < 0 and len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    return data[:size] if offset >= 0 else data


def read_bytes(path, offset: int, size: int, max_bytes: int = MAX_BYTES,
               max_row_group_bytes: int = MAX_ROW_GROUP_BYTES) -> bytes:
    """The bytes at one input address (``sources.InputFile``): a plain file (offset < 0), a tar member (read in
    place at its offset, never extracted), or row `offset` of a parquet file (size == PARQUET_ROW).

    `path` is a local path (str or Path) or, when it holds "://", an fsspec URL (``s3://bucket/key``): a member
    or object is then one ranged GET (``remote.read_range``), never a local copy of the archive. More than
    `max_bytes` is never read: ImageRejected("too_large").
    """
    path = str(path)
    if "\0" in path:
        raise ImageRejected("bad_name", "path holds a NUL byte")
    if size == PARQUET_ROW:
        data = read_parquet_image(path, offset, max_row_group_bytes)
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
        return data
    if offset >= 0 and size > max_bytes:
        raise too_large(size, max_bytes)
    if "://" in path:
        data = read_range(path, offset, size if offset >= 0 else max_bytes + 1)
        if offset < 0 and len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
    else:
        data = _read_local(path, offset, size, max_bytes)
    if offset >= 0 and len(data) != size:
        raise ImageRejected("truncated", f"archive member ends after {len(data)} of {size} bytes")
    return data
