"""Where data lives: a local path or an object-store URL (``s3://bucket/prefix``), behind one set of functions.

The one module that tells URLs from local paths. Local paths keep exactly what they always did (``Path``
objects, atomic temp + fsync + rename writes from core.files); a URL goes through fsspec (s3fs for
``s3://``, so any S3-compatible store works). Callers keep a location as ``Path`` (local) or ``str`` (URL):
``as_location`` makes one from user text (argparse's ``type=Path`` would turn ``s3://b/p`` into ``s3:/b/p``)
and ``join`` extends either kind.

Configuration is the standard one of the AWS SDKs, read by botocore, nothing of ours: credentials from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile, ``AWS_PROFILE``, an instance role), the region
from ``AWS_REGION``, an S3-compatible endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), retries
from ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``; the same keys work in ``~/.aws/config``.

Why no retry loop here: botocore retries throttling and 5xx answers with backoff (its retry mode), and s3fs
retries every ranged read that fails mid-body (connection reset, timeout, payload error) with backoff, up to
``S3FileSystem.retries`` times -- a shard streamed in ranges therefore resumes at the failed range, it does
not start over. What still fails after that reaches the reader as an OSError, which the shard readers count
and skip like a corrupt shard.

Writes on an object store: an object is never visible half-written (a PUT, or a multipart upload that
becomes visible only when completed), so "write whole, then the receipt" keeps the exactly-once argument of
data_prep without a rename. ``write_bytes(..., exclusive=True)`` is S3's conditional write (If-None-Match:
``*``) and ``update_object`` is a compare-and-swap on the ETag (If-Match): the object-store stand-ins for
O_EXCL and a lock file around a read-modify-write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from core.errors import UserError
from core.files import atomic_path, atomic_write_bytes, new_temp

Location = Union[str, Path]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
READ_BLOCK = 8 << 20       # bytes per ranged GET when streaming a shard (one retry unit)
_CAS_ATTEMPTS = 20         # compare-and-swap rounds before giving up (another writer keeps winning)


def is_url(location: Location) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a Path is never a URL)."""
    if isinstance(location, Path):
        return False
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
READ_SCHEMES = ("s3", "s3a")  # object stores the shard readers open (pipeline.data.shards registers them)


def refuse_credentials(text: Union[str, Path], what: str = "location") -> None:
    """A URL with credentials in it (``s3://KEY:SECRET@bucket``) is refused, naming it without them: it would be
    kept in _info.json, config.yaml copies and logs. Credentials come from the AWS environment (module docstring)."""
    if isinstance(text, str) and _USERINFO.match(text):
        shown = _USERINFO.sub(r"\1***@", text)
        raise UserError(f"{what} {shown} holds credentials (user:secret@), which would be stored in logs and "
                        f"_info.json; remove them and give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a "
                        f"profile")


def check_read_location(text: Optional[str], what: str) -> None:
    """Shards are read from a local path or an object-store URL only: webdataset would run `pipe:CMD` (and
    curl for http URLs) as a program."""
    if text is None:
        return
    refuse_credentials(text, what)
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else None
    if text.startswith("pipe:") or (scheme is not None and scheme not in READ_SCHEMES + ("file",)):
        raise UserError(f"{what}={text!r} is not a local path or an {'/'.join(READ_SCHEMES)}:// URL; `pipe:` "
                        f"and other schemes make webdataset run programs: give the shard folder or bucket")


def as_location(text: Union[str, Path]) -> Location:
    """User text -> a URL string without a trailing slash, or a Path (``file://`` URLs become paths)."""
    text = str(text)
    refuse_credentials(text)
    if is_url(text):
        scheme, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise UserError(f"{text}: give a bucket (and optionally a prefix), e.g. {scheme}://bucket/shards")
        return f"{scheme}://{rest}"
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text)


def join(location: Location, *parts: str) -> Location:
    """``location / part / ...`` for either kind."""
    if not is_url(location):
        return Path(location).joinpath(*parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(location: Location) -> str:
    return Path(location).name if not is_url(location) else str(location).rstrip("/").rsplit("/", 1)[-1]


def _fs(url: str):
    """(fsspec filesystem, path inside it) for a URL; a missing backend is a one-line error."""
    import fsspec

    refuse_credentials(url)
    try:
        # No listing cache: other processes (Ray tasks, other ranks) add objects that a cached listing of this
        # process would hide, and s3fs answers exists()/info() from a cached listing of the parent prefix.
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError as err:
        raise UserError(f"{url}: this kind of URL needs a package that is not installed ({err})") from None
    except ValueError as err:  # unknown protocol
        raise UserError(f"{url}: {err}") from None


@contextlib.contextmanager
def user_errors(location: Location, what: str):
    """Turn the store's refusals (no bucket, no credentials, access denied) into one line naming `location`.

    Only for URLs: local OSErrors keep their handling by the callers (full disk and the like).
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp raise many types; sorted by what they mean
        if not is_url(location):
            raise
        name = type(err).__name__
        message = " ".join(str(err).split()) or name
        if "Credentials" in name or "credential" in message.lower():
            hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this store"
        elif isinstance(err, PermissionError) or "AccessDenied" in message or "Forbidden" in message:
            hint = "the credentials in use may not access it; check the bucket policy or AWS_PROFILE"
        elif isinstance(err, FileNotFoundError) and "bucket" in message.lower():
            hint = "create the bucket first, or check the name (and AWS_ENDPOINT_URL for an S3-compatible store)"
        elif "Could not connect" in message or "Connect" in name or "EndpointConnection" in name:
            hint = "check AWS_ENDPOINT_URL and that the store is reachable"
        else:
            raise
        raise UserError(f"{location}: cannot {what} ({message[:200]}); {hint}") from None


def require_bucket(location: Location) -> None:
    """For a URL: its bucket exists (else one line), checked before a long job starts. Paths: nothing to do."""
    if not is_url(location):
        return
    fs, path = _fs(str(location))
    bucket = path.split("/", 1)[0]
    with user_errors(location, "use it"):
        if not fs.exists(bucket):
            raise UserError(f"{location}: the bucket {bucket!r} does not exist; create it first, or check the name "
                            f"(and AWS_ENDPOINT_URL for an S3-compatible store)")


# ------------------------------------------------------------------------------------------------ reading
def exists(location: Location) -> bool:
    """A file or object -- or, for a URL, any object under the prefix -- exists."""
    if not is_url(location):
        return Path(location).exists()
    fs, path = _fs(str(location))
    return fs.exists(path)


def isdir(location: Location) -> bool:
    """A folder, or a prefix with objects under it."""
    if not is_url(location):
        return Path(location).is_dir()
    fs, path = _fs(str(location))
    return fs.isdir(path)


def size(location: Location) -> int:
    """Bytes of a file or object; FileNotFoundError if there is none."""
    if not is_url(location):
        return Path(location).stat().st_size
    fs, path = _fs(str(location))
    return int(fs.size(path))


def read_bytes(location: Location) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _fs(str(location))
    return fs.cat_file(path)


def read_json(location: Location) -> Any:
    """Parsed JSON, or None when it does not exist or is damaged."""
    try:
        return json.loads(read_bytes(location))
    except (OSError, ValueError):
        return None


def open_read(location: Location, block_size: int = READ_BLOCK):
    """A binary stream, read front to back (a shard): local files as they are, objects in ranged GETs of
    `block_size` bytes with read-ahead, each retried on its own (see the module docstring)."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = _fs(str(location))
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def sha256(location: Location) -> str:
    digest = hashlib.sha256()
    with open_read(location) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listdir(location: Location, pattern: str = "*") -> list[str]:
    """Sorted names (not paths) directly in a folder or under a prefix matching a glob `pattern`."""
    if not is_url(location):
        return sorted(p.name for p in Path(location).glob(pattern))
    fs, path = _fs(str(location))
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/{pattern}"))


def has_entries(location: Location) -> bool:
    """A non-empty folder, or a prefix with at least one object under it."""
    if not is_url(location):
        path = Path(location)
        return path.is_dir() and any(path.iterdir())
    fs, path = _fs(str(location))
    try:
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------ writing
def makedirs(location: Location) -> None:
    """A local folder with its parents. Object stores have no folders: a prefix exists once an object has it."""
    if not is_url(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def write_bytes(location: Location, data: bytes, exclusive: bool = False) -> None:
    """Write whole: a reader sees the old content or the new, never a part.

    `exclusive`: fail with FileExistsError if something is already there (local: a hard link of the finished
    temp file, which refuses an existing name; S3: a conditional PUT).
    """
    if not is_url(location):
        path = Path(location)
        if not exclusive:
            atomic_write_bytes(path, data)
            return
        tmp = new_temp(path)  # core.files' temp naming: cleaned up alike
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    fs, path = _fs(str(location))
    try:
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
    except OSError as err:
        if exclusive and _precondition_failed(err):
            raise FileExistsError(str(location)) from None
        raise


def write_json(location: Location, obj: Any, indent: Optional[int] = 1, exclusive: bool = False) -> None:
    write_bytes(location, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"), exclusive)


def upload(local_file: Path, location: str) -> None:
    """Copy a finished local file to an object in one piece (a multipart upload is invisible until completed)."""
    fs, path = _fs(location)
    fs.put_file(str(local_file), path)


def _precondition_failed(err: OSError) -> bool:
    return isinstance(err, FileExistsError) or "pre-condition" in str(err) or "PreconditionFailed" in str(err)


def update_object(location: str, change: Callable[[Optional[bytes]], bytes]) -> None:
    """Read-modify-write of one object that never loses a concurrent writer's change.

    `change(old bytes or None) -> new bytes`; written only if the object is still the one read (If-Match on its
    ETag, or If-None-Match when there was none), else read again and retried. This is what a lock file does
    for a local read-modify-write, without a lock that a killed job could leave behind.
    """
    fs, path = _fs(location)
    for _ in range(_CAS_ATTEMPTS):
        try:
            fs.invalidate_cache(path)
            etag = fs.info(path)["ETag"]  # read before the content: a newer content fails the If-Match below
            old = fs.cat_file(path)
        except FileNotFoundError:
            etag, old = None, None
        new = change(old)
        condition = {"IfMatch": etag} if etag else {}
        try:
            fs.pipe_file(path, new, mode="overwrite" if etag else "create", **condition)
            return
        except OSError as err:
            if not _precondition_failed(err):
                raise
    raise OSError(f"{location}: other writers kept changing it; {_CAS_ATTEMPTS} attempts failed")


def remove(location: Location) -> None:
    """Delete a file or object; nothing there is fine."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(str(location))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(location: Location) -> None:
    """Delete a folder or every object under a prefix; nothing there is fine."""
    if not is_url(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(str(location))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def local_file_for(location: Location, suffix: str = "") -> Iterator[Path]:
    """A local path to write a whole file to, then publish at `location` when the block succeeds.

    Local: core.files.atomic_path (temp beside the target, fsync, rename). URL: a temp file on this machine,
    uploaded whole and then deleted. Why a temp file and not fsspec's streaming writer: on an exception its
    context manager *completes* the upload, which would publish half a shard under the final name.
    """
    if not is_url(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    import tempfile

    handle, name = tempfile.mkstemp(prefix=".upload-", suffix=suffix)
    os.close(handle)
    try:
        yield Path(name)
        upload(Path(name), str(location))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
