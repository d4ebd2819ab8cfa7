"""Read the bytes at one input address (``listing.InputFile``): a plain file, a tar member or a parquet row,
local or in object storage. Kept apart from ``images`` (pure functions of bytes) so that module imports no
source reader."""
from __future__ import annotations

from data_prep.images import PARQUET_ROW, ImageRejected
from data_prep.sources.parquet import read_parquet_image  # pyarrow is imported inside it, only when used
from data_prep.sources.remote import read_range


def read_bytes(path, offset: int, size: int) -> bytes:
    """The bytes at one input address (``sources.InputFile``): a plain file (offset < 0), a tar member (read in
    place at its offset, never extracted), or row `offset` of a parquet file (size == PARQUET_ROW).

    `path` is a local path (str or Path) or, when it holds "://", an fsspec URL (``s3://bucket/key``): a member
    or object is then one ranged GET (``remote.read_range``), never a local copy of the archive.
    """
    path = str(path)
    if size == PARQUET_ROW:
        return read_parquet_image(path, offset)
    if "://" in path:
        data = read_range(path, offset, size)
        if offset >= 0 and len(data) != size:
            raise ImageRejected("truncated", f"archive member ends after {len(data)} of {size} bytes")
        return data
    with open(path, "rb") as handle:
        if offset < 0:
            return handle.read()
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise ImageRejected("truncated", f"archive member ends after {len(data)} of {size} bytes")
    return data
