"""Sources that are already packed -- webdataset tars (``webdataset.py``) and parquet files of image bytes
(``parquet.py``), local or in object storage (``remote.py``) -- and how the kind of a URL SRC is detected."""
from __future__ import annotations

from data_prep.sources.remote import filesystem, has_glob, list_files
from data_prep.sources.webdataset import peek_tar

PACKED_KINDS = ("webdataset", "parquet")


def detect(src) -> str | None:
    """Kind of a URL or pattern SRC: 'webdataset' or 'tars' (the first .tar decides), 'parquet', 'folder' (a
    prefix with sub-prefixes and no .tar/.parquet files: an ImageFolder tree), or None when unsure."""
    _base, tars = list_files(src, ".tar")
    if tars:
        return peek_tar(tars[0].location)
    _base, parquets = list_files(src, ".parquet")
    if parquets:
        return "parquet"
    if has_glob(src):
        return None
    fs, path = filesystem(str(src))
    try:
        return "folder" if any(i.get("type") == "directory" for i in fs.ls(path, detail=True)) else None
    except Exception:  # noqa: BLE001 - not listable: list_files said so already, or it is a single object
        return None
