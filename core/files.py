"""Atomic file writes: write beside the target, fsync, rename. A reader sees the old file or the new one.

One implementation for every stage (shard receipts and plans, `_info.json`, checkpoint markers,
metrics summaries, evaluation results, exports), so a kill at any moment never leaves half a file
under its final name and never a stray temp file that a later run mistakes for data.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_temp(path: PathLike) -> Path:
    """A new empty file beside `path`, made exclusively (O_EXCL, O_NOFOLLOW: never an existing file or a link
    someone planted) under an unpredictable name; its mode follows the umask (`apply_umask`)."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temp file beside {path}")


@contextlib.contextmanager
def atomic_path(path: PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path` (`new_temp`); when the block succeeds it is fsynced and renamed onto `path`.

    For libraries that write a file themselves (safetensors, tarfile). On an exception the temp file
    is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = new_temp(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically (and durably unless `durable=False`)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: PathLike, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 1, durable: bool = True,
                      sort_keys: bool = False) -> None:
    """`obj` as JSON (a trailing newline), written atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    atomic_write_text(path, text, durable=durable)


def stale_temps(directory: PathLike, name_glob: str = "*") -> list[Path]:
    """Temp files that `atomic_path` left beside targets matching `name_glob` (its writer was killed).

    The temp naming lives here only: a caller that cleans up (or a test that checks nothing is left) asks
    this function instead of spelling the pattern itself.
    """
    return sorted(Path(directory).glob(f".{name_glob}.tmp.*"))


UMASK_ENV = "COATNET_UMASK"
DEFAULT_UMASK = 0o077


def apply_umask() -> int:
    """Set the process umask every entry point writes under: 077 (run folders, checkpoints, exports, shards readable
    and writable by their owner only), or $COATNET_UMASK (octal, e.g. 027 for a team sharing runs read-only).
    Ranks, Ray workers and DeepSpeed's files inherit it; a umask that lets group or others write is refused.
    Returns the umask set. A bad $COATNET_UMASK is a
    ValueError with the one line to print (core.errors.cli_main reports it as a user error; this module stays
    below core.errors in the import graph)."""
    text = os.environ.get(UMASK_ENV, "").strip()
    try:
        mask = int(text, 8) if text else DEFAULT_UMASK
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise ValueError(f"{UMASK_ENV}={text!r} is not an octal umask such as 077 or 027; fix or unset it")
    if mask & 0o022 != 0o022:  # a resume refuses checkpoint files others can write (pipeline/checkpoint/trust.py)
        raise ValueError(f"{UMASK_ENV}={text!r} lets group or others write run folders and checkpoints, which a "
                         f"resume then refuses as possibly tampered with; use 077, 027 or 022")
    os.umask(mask)
    return mask


_OWNER = "owner.json"


def _owner_gone(folder: Path, host: str) -> bool:
    """Whether the process that made `folder` (owned_temp_dir) is gone: its record names this host and its
    lock on the record can be taken. The kernel drops a lock when its holder dies, SIGKILL included, and a
    lock works across PID namespaces (containers sharing a hostname and /tmp), where a pid would not."""
    import fcntl

    try:
        with open(folder / _OWNER, "rb") as handle:
            if json.loads(handle.read() or b"{}").get("host") != host:
                return False
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except (OSError, ValueError, AttributeError):  # no record (being made; older code), or held: alive
        return False


@contextlib.contextmanager
def owned_temp_dir(prefix: str, on_removed=None) -> Iterator[Path]:
    """tempfile.TemporaryDirectory(prefix=prefix) that also cleans up after the killed.

    A process killed by SIGKILL (or on a node that was lost and came back) cannot remove its temp folder,
    and a listing spill of a billion rows is hundreds of GB of local disk. So each folder holds a record of
    its host and pid, locked while the folder is in use, and entering this first removes the `prefix`
    folders of this host whose lock is free; on_removed(path) is told of each folder removed.
    """
    import fcntl
    import shutil
    import socket
    import tempfile

    host = socket.gethostname()
    for folder in sorted(Path(tempfile.gettempdir()).glob(f"{prefix}*")):
        if _owner_gone(folder, host):
            shutil.rmtree(folder, ignore_errors=True)
            if on_removed is not None and not folder.exists():
                on_removed(folder)
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        with open(Path(name) / _OWNER, "wb") as record:
            fcntl.flock(record, fcntl.LOCK_EX)  # held until the folder is removed (or the process dies)
            record.write(json.dumps({"host": host, "pid": os.getpid()}).encode())
            record.flush()
            yield Path(name)
