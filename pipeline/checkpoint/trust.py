"""Which checkpoints may be unpickled: those this user's key signed, in folders only this user can write.

DeepSpeed checkpoints are pickles, and unpickling runs code. A completion marker alone proves nothing (anyone
can write `complete.json`), so the trainer signs it: an HMAC-SHA256, with a per-user secret key, over the
marker's content, which records the sha256 of every file of the checkpoint. Before any pickle of a tag is read
(export, evaluate, fine-tune `pretrained=`, resume, the universal conversion) the reader checks:

* the marker's signature verifies with this user's key (so a stranger cannot forge or alter a marker);
* every file about to be read is recorded in it with the same sha256 (so no file was swapped or planted);
* the tag folder and its files are owned by this user and not writable by group or others (so nobody else
  can change them between the check and the read).

The user overrides all of it for a checkpoint they trust (`--trust-checkpoint`, `pretrained_trusted: true`,
`checkpoint.trust: true`). The key is `~/.config/coatnet-pipeline/checkpoint.key` (0600, created on first use)
or the file named by $COATNET_CHECKPOINT_KEY; rank 0 signs and verifies, so it must be the same file wherever
rank 0 of a run (and the export/evaluate after it) runs: a shared home directory gives that.

Limits: root, or anyone who can read the key, can sign; a checkpoint the same user signed earlier can be put back
in place of a newer one (it is still theirs); the checks run before the read, so a file the user themselves
changes in between is not caught.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from typing import Optional

from core.errors import UserError

KEY_ENV = "COATNET_CHECKPOINT_KEY"
DEFAULT_KEY = os.path.join("~", ".config", "coatnet-pipeline", "checkpoint.key")
SIGNATURE = "signature"
DIGEST = "sha256"  # the file digest a signed marker must record (integrity.ALGORITHM)
# Files of a tag folder that are unpickled (DeepSpeed's model/optimizer states, universal fp32.pt).
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
HOW_TO_TRUST = ("if you trust where it came from, pass --trust-checkpoint (pipeline.evaluate / pipeline.export), "
                "pretrained_trusted=true (fine-tuning) or checkpoint.trust=true (resuming)")


class UntrustedCheckpoint(UserError):
    """A checkpoint that would be unpickled and whose origin cannot be proven; one line, saying how to trust it."""


def key_path() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(KEY_ENV) or DEFAULT_KEY))


def _read_key(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise UserError(f"cannot read the checkpoint key {path} ({e.strerror}); it must be a regular file of "
                        f"yours (set {KEY_ENV} to another path)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise UserError(f"the checkpoint key {path} must be a regular file owned by you and readable by you "
                            f"only: chmod 600 {path} (or set {KEY_ENV} to a private key file)")
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(data.decode("ascii"))
    except ValueError:
        key = b""
    if len(key) < 32:
        raise UserError(f"the checkpoint key {path} is not 64+ hex digits; delete it (checkpoints it signed then "
                        f"need checkpoint.trust=true) or restore it")
    return key


def load_key(create: bool) -> Optional[bytes]:
    """This user's key; made (0600, in a 0700 folder) when missing and `create`, else None when missing."""
    path = key_path()
    if not os.path.lexists(path):
        if not create:
            return None
        folder = os.path.dirname(path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # Written whole under a private temporary name, then hard-linked into place: the link is atomic and fails
        # when the key exists, so two ranks (or runs) creating it at once agree on the first one's key, and no
        # reader ever sees a half-written (empty) key file.
        fd, temp = tempfile.mkstemp(prefix=".checkpoint.key.", dir=folder or ".")
        try:
            try:
                os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(temp)
    return _read_key(path)


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"coatnet-checkpoint-key-id" + key).hexdigest()[:12]


def _payload(meta: dict) -> bytes:
    body = {k: v for k, v in meta.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def sign(meta: dict) -> dict:
    """`meta` (a marker holding sha256 file digests) with this user's signature added (the key is made if missing)."""
    key = load_key(create=True)
    meta = json.loads(json.dumps(meta))  # as a reader will see it (tuples as lists, keys as strings)
    mac = hmac.new(key, _payload(meta), hashlib.sha256).hexdigest()
    return {**meta, SIGNATURE: {"alg": "hmac-sha256", "key": _key_id(key), "mac": mac}}


def mark_signed(tag_dir: str, meta: dict) -> None:
    """Write `tag_dir`'s signed completion marker: `meta` plus the sha256 of every file under it, hashed here
    (one process: a universal conversion; tests that lay out a run's checkpoints as the trainer does)."""
    from pipeline.checkpoint.layout import MARKER, write_marker
    from pipeline.checkpoint.integrity import ALGORITHM, merge_files

    files = merge_files(tag_dir, [], skip=(MARKER,))
    write_marker(tag_dir, sign({**meta, "checksum": ALGORITHM, "files": files}))


def signature_problem(meta: Optional[dict]) -> Optional[str]:
    """Why `meta` is not a marker this user's key signed over sha256 digests; None when it is."""
    if not isinstance(meta, dict):
        return "it has no readable completion marker"
    signed = meta.get(SIGNATURE)
    if not isinstance(signed, dict) or not isinstance(signed.get("mac"), str):
        return "its marker is not signed (written by other code, or by this tool before checkpoints were signed)"
    key = load_key(create=False)
    if key is None:
        return f"there is no checkpoint key {key_path()} here to verify its signature"
    if signed.get("key") != _key_id(key):
        return f"its marker was signed with another key (not {key_path()}: another user's, or another node's)"
    expected = hmac.new(key, _payload(meta), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signed["mac"]):
        return "its marker was altered after it was signed"
    if meta.get("checksum") != DIGEST or not isinstance(meta.get("files"), dict):
        return f"its marker records no {DIGEST} file digests"
    return None


def private_problem(path: str) -> Optional[str]:
    """Why someone other than this user could change `path` (not followed if a link); None when nobody can."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (chmod go-w)"
    return None


def _unrecorded(tag_dir: str, files: dict) -> list[str]:
    """Pickle files under `tag_dir` that the marker does not record (planted beside a signed checkpoint)."""
    out = []
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), tag_dir)
            if name.endswith(PICKLE_SUFFIXES) and rel not in files:
                out.append(rel)
    return sorted(out)


def tag_problem(tag_dir: str, meta: Optional[dict], digests: bool = True) -> Optional[str]:
    """Why the checkpoint in `tag_dir` (marker `meta`) may not be unpickled; None when this user wrote it.

    `digests=False` leaves the sha256 of the files to the caller (resume: each rank checks its share)."""
    from pipeline.checkpoint.integrity import file_checksum

    problem = signature_problem(meta) or private_problem(tag_dir)
    if problem:
        return problem
    files = meta["files"]
    extra = _unrecorded(tag_dir, files)
    if extra:
        return f"{extra[0]} is not among the files its signed marker records"
    for rel, record in sorted(files.items()):
        path = os.path.join(tag_dir, rel)
        if not digests and not os.path.lexists(path):
            continue  # damage, not forgery: resume's digest check reports it and falls back to an older one
        problem = private_problem(path)
        if problem:
            return problem
        if digests and file_checksum(path, DIGEST) != record.get("checksum"):
            return f"{path} is not the file its signed marker records (altered or replaced)"
    return None


def require_trusted(tag_dir: str, meta: Optional[dict], trust: bool) -> None:
    """Raise UntrustedCheckpoint unless the user trusts `tag_dir` or `tag_problem` finds nothing."""
    if trust:
        return
    problem = tag_problem(tag_dir, meta)
    if problem:
        raise UntrustedCheckpoint(
            f"refusing to read the checkpoint {tag_dir}: {problem}. Its files are pickles, which can run code "
            f"when read; this tool reads only checkpoints your key ({key_path()}) signed; {HOW_TO_TRUST}")


def require_trusted_resume(tag_dir: str, meta: dict, is_main: bool, trust: bool) -> None:
    """Resume's check, on every rank at once: rank 0 checks the signature of the marker it read (and broadcast:
    every rank checks its share of the files against it) and who can write the files, and every rank raises the
    same one-line error, so none is left waiting in a collective; `trust` (checkpoint.trust) skips it."""
    from pipeline.runtime import distributed as D

    if trust:
        return
    D.raise_on_every_rank(is_main, lambda: tag_problem(tag_dir, meta, digests=False), lambda problem: UntrustedCheckpoint(
        f"refusing to resume from {tag_dir}: {problem}. Its files are pickles, which can run code when read; "
        f"a run resumes only from checkpoints your key ({key_path()}) signed; {HOW_TO_TRUST}"))


def require_key(is_main: bool) -> None:
    """Make (or check) the key that will sign this run's checkpoints at the start, on rank 0, and raise the same
    one line on every rank: found at the first save, a home folder that is read-only or a key others can read
    would end a run hours in, with an unrelated message."""
    from pipeline.runtime import distributed as D

    def check() -> Optional[str]:
        try:
            load_key(create=True)
        except OSError as err:
            return (f"cannot create the checkpoint key {key_path()} ({err.strerror}); set {KEY_ENV} to a private "
                    f"file on a filesystem this user can write, the same on every node")
        return None

    D.raise_on_every_rank(is_main, check)
