"""The work Ray runs on every node: scanning chunks of inputs, and writing one whole shard per task.

Plain functions (no Ray import): the job wraps them with ``ray.remote``, the benchmark and tests can call
them directly.

Why ``tarfile`` with fixed ``TarInfo`` fields and not webdataset's ``TarWriter``: importing webdataset
imports torch (about 1.5 s and a few hundred MB in *every* Ray worker, for a job that never touches a
tensor), and ``TarWriter`` is a thin loop over ``tarfile.addfile`` anyway. We write the same layout it
writes (USTAR headers; per sample ``<key>.cls``, ``<key>.jpg``, ``<key>.json`` -- plus ``<key>.labels`` in
multi-label splits -- in sorted order; mode 0444)
and pin every field that would otherwise vary: mtime 0, uid/gid 0, fixed uname/gname. The result is
byte-identical on every run and is read back by stock ``webdataset.WebDataset`` and
``ray.data.read_webdataset`` in the tests. We stream into our own file object (a temp file from
``core.storage.local_file_for``: beside the shard, fsynced and renamed when complete; for an object-store OUT
a local temp file uploaded whole) and hash the bytes as they are written instead of reading them back.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

from core import storage
from core.storage import Location

from data_prep.errors import InputChanged, UserError
from data_prep.images import ImageOptions, ImageRejected, classify_error, encode, scan
from data_prep.near_dup.exclude import mark_near_duplicates
from data_prep.near_dup.hashing import bytes_hash
from data_prep.sources.read import read_bytes
from data_prep.shard.layout import inputs_path, read_json, receipt_path, scan_path, scan_receipt_path
from data_prep.shard.plan import Entry, sample_key, shard_hash

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit

TAR_MTIME = 0            # every member gets this mtime: reproducible archives
TAR_USER = "data_prep"
TAR_MODE = 0o444


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (benchmark, unit tests) there is no node id
        pass
    return "local"


def scan_chunk(items: list[tuple[str, str, int, int]], opts: ImageOptions, near=None) -> list[tuple]:
    """[(id, path, offset, size)] -> [(id, reason, detail, width, height, sha1)]; never raises per file.

    ``near`` (--exclude-near: a ``near_dup.exclude.EvalIndex``): usable images are also decoded for their
    perceptual hash, and those near an evaluation image become 'near_duplicate' rejects (with a 7th item,
    the match). Without it nothing more is decoded than before."""
    out, hashes = [], {}
    for file_id, path, offset, size in items:
        try:
            data = read_bytes(path, offset, size, opts.max_bytes, opts.max_row_group_bytes)
        except FileNotFoundError:
            out.append((file_id, "unreadable", "file not found", 0, 0, ""))
            continue
        except (OSError, ImageRejected) as err:
            rejected = classify_error(err)
            out.append((file_id, rejected.reason, rejected.detail, 0, 0, ""))
            continue
        result = scan(data, opts.max_pixels)
        reason, detail = result.reason, result.detail
        if near is not None and reason is None:
            try:
                hashes[len(out)] = bytes_hash(data, opts.max_pixels)
            except ImageRejected as err:  # it would fail the shard's full decode too: a reject now
                reason, detail = err.reason, err.detail
        out.append((file_id, reason, detail, result.width, result.height, result.sha1))
    return mark_near_duplicates(out, hashes, near) if hashes else out


def _synthetic_scan(items: list[tuple[str, str, int, int]], _opts: ImageOptions, _near=None) -> list[tuple]:
    """benchmarks/plan_scale.py: every input usable, sha1 of its id; no file is read (planning alone)."""
    return [(file_id, None, "", 64, 48, hashlib.sha1(file_id.encode()).hexdigest()) for file_id, *_ in items]


SCAN_BATCH = 1024  # rows scanned and written per step: a task holds this many results, not its partitions


def scan_partitions(out: str, split: str, fingerprint: str, parts: list[int], max_pixels: int,
                    synthetic: bool = False, options: dict | None = None, near=None) -> list[dict]:
    """Scan whole order partitions: rows [key, id, class, path, offset, size, labels] (sorted by key) ->
    ``scan/PPP.jsonl.gz`` (the rows plus reason, detail, width, height, sha1), then its receipt ``scan/PPP.json``
    (fingerprint, counts, the scan's rejects). A kill leaves a partition without receipt: it is scanned again.

    A partition's rows are streamed from ``OUT/_state/<split>/inputs/PPP.jsonl``, where the job copied them,
    so neither the driver nor Ray's object store holds a partition. ``options`` (ImageOptions as a dict: the
    byte limits) wins over ``max_pixels`` when given. ``near``: the --exclude-near index (``scan_chunk``); Ray
    hands every task the one copy the driver put in its object store."""
    opts = ImageOptions(**options) if options is not None else ImageOptions(max_pixels=max_pixels)
    try:
        return _scan_partitions(out, split, fingerprint, parts, opts, synthetic, near)
    except OSError as err:
        if err.errno in SPACE_ERRNOS:
            raise OutOfSpace(f"{err.strerror or err} writing the scan results") from None
        raise


def _published_rows(out_dir: Location, split: str, part: int):
    with storage.open_read(inputs_path(out_dir, split, part)) as handle:
        for line in handle:
            yield json.loads(line)


def _batches(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _scan_partitions(out: str, split: str, fingerprint: str, parts: list, opts: ImageOptions,
                     synthetic: bool, near=None) -> list[dict]:
    out_dir = storage.as_location(out)
    scan = _synthetic_scan if synthetic else scan_chunk
    receipts = []
    for part in parts:
        rejects, inputs, usable, usable_bytes = [], 0, 0, 0
        buffer = io.BytesIO()  # the compressed results (a few % of the rows); written whole below
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as packed:
            for batch in _batches(_published_rows(out_dir, split, part), SCAN_BATCH):
                results = scan([(r[1], r[3], r[4], r[5]) for r in batch], opts, near)
                lines = []
                for row, (_id, reason, detail, width, height, sha1, *match) in zip(batch, results):
                    lines.append(json.dumps([*row, reason, detail, width, height, sha1], ensure_ascii=False,
                                            separators=(",", ":")) + "\n")
                    if reason is None:
                        usable += 1
                        usable_bytes += max(row[5], 0)
                    else:
                        rejects.append({"source": row[1], "class": row[2], "reason": reason, "detail": detail,
                                        **(match[0] if match else {})})
                packed.write("".join(lines).encode("utf-8"))
                inputs += len(batch)
        data = buffer.getvalue()
        path = scan_path(out_dir, split, part)
        if not storage.is_url(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(path, data)
        receipt = {"fingerprint": fingerprint, "partition": part, "inputs": inputs, "usable": usable,
                   "usable_bytes": usable_bytes, "rejects": rejects, "sha256": hashlib.sha256(data).hexdigest()}
        storage.write_json(scan_receipt_path(out_dir, split, part), receipt, indent=None)
        receipts.append(receipt)
    return receipts


def read_scanned(out: Location, split: str, part: int):
    """The scan rows of one partition, in order-key order (none for an empty partition); decompressed as they
    are read, so a reader that stops early (a shard's last range) never holds the whole partition."""
    try:
        data = storage.read_bytes(scan_path(out, split, part))
    except FileNotFoundError:
        return
    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as handle:
        for line in handle:
            yield json.loads(line)


def plan_entries(out: Location, split: str, ranges: list[tuple[int, int, int]], classes: list[str],
                 duplicates: dict[str, str]) -> list[Entry]:
    """The entries of one shard: positions [first, stop) of each partition's usable inputs (scan passed, not a
    --dedup duplicate), in order-key order -- read from the scan files, never passed by the driver."""
    label_of = {name: i for i, name in enumerate(classes)}
    entries = []
    for part, first, stop in ranges:
        position = 0
        for key, file_id, name, path, offset, size, labels, reason, _detail, width, height, sha1 in \
                read_scanned(out, split, part):
            if reason is not None or file_id in duplicates:
                continue
            if first <= position < stop:
                multi = [label_of[n] for n in labels] if labels is not None else None
                entries.append(Entry(sample_key(file_id), file_id, path, offset, size, label_of[name], name, sha1,
                                     width, height, multi, list(labels) if labels is not None else None))
            position += 1
            if position >= stop:
                break
    return entries


def write_planned_shard(out: str, split: str, filename: str, ranges: list, classes: list[str],
                        duplicates: dict[str, str], options: dict) -> dict:
    """`write_shard` for the shard that covers `ranges` of the partitioned plan; the receipt gains the labels
    written (per class, and labels per image) so the driver never needs the entries."""
    out_dir = storage.as_location(out)
    entries = plan_entries(out_dir, split, [tuple(r) for r in ranges], classes, duplicates)
    receipt = write_shard(out, split, filename, shard_hash(entries), [e.to_list() for e in entries], options)
    late = {r["source"] for r in receipt["rejects"]}
    per_class: dict[str, int] = {}
    sizes = []
    for e in entries:
        if e.id in late:
            continue
        names = e.label_names if e.labels is not None else [e.class_name]
        for n in names:
            per_class[n] = per_class.get(n, 0) + 1
        sizes.append(len(names))
    return {**receipt, "planned": len(entries), "per_class": per_class,
            "labels_per_image": [sum(sizes), max(sizes, default=0)]}


class OutOfSpace(UserError):
    """OUT's filesystem refused a write (full, quota, size limit). Raised inside a Ray task; the driver turns it
    into one line that says how much space the rest of the job needs. The temp file is gone; re-run resumes."""

    def __init__(self, message: str, filename: str = ""):  # (message,) alone must rebuild it: Ray pickles it
        super().__init__(message)
        self.filename = filename


class _HashingFile:
    """File wrapper that sha256s and counts what tarfile streams through it (no second read of the shard)."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        if self.handle.closed:  # a failed shard: tarfile's finaliser flushes after we dropped the temp file
            return len(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class ShardTarWriter:
    """Writes samples as tar members with every header field pinned (see the module docstring)."""

    def __init__(self, fileobj):
        # "w|": a pure stream (no seeks), tarfile's fixed 10 KiB record blocking, USTAR headers.
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, parts: dict[str, bytes]) -> None:
        for ext in sorted(parts):
            data = parts[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = TAR_USER
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def sample_json(entry: Entry) -> bytes:
    meta = {"source": entry.id, "class": entry.class_name, "label": entry.label, "width": entry.width,
            "height": entry.height, "sha1": entry.sha1}
    if entry.labels is not None:  # multi-label only: single-label samples keep their exact bytes
        meta.update(labels=list(entry.labels), classes=list(entry.label_names or []))
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def file_sha256(path: Location) -> str:
    """sha256 of a local file or an object (streamed)."""
    return storage.sha256(path)


def valid_receipt(out: Location, split: str, filename: str, plan_hash: str) -> dict | None:
    """The receipt of a finished shard if it belongs to this plan and the stored tar still matches it."""
    receipt = read_json(receipt_path(out, split, filename))
    if not isinstance(receipt, dict) or receipt.get("plan_hash") != plan_hash:
        return None
    tar = storage.join(out, filename)
    try:
        if storage.size(tar) != receipt.get("bytes"):
            return None
        return receipt if file_sha256(tar) == receipt.get("sha256") else None
    except OSError:
        return None


def _sample_parts(entry: Entry, opts: ImageOptions, rejects: list[dict]) -> dict[str, bytes] | None:
    """The tar members of one sample, or None (and a reject) when its full decode fails."""
    # A read error or other bytes now would make the shard depend on *when* it was written: stop the job
    # instead of dropping the sample (re-running resumes).
    try:
        data = read_bytes(entry.path, entry.offset, entry.size, opts.max_bytes, opts.max_row_group_bytes)
    except (OSError, ImageRejected) as err:
        raise InputChanged(f"{entry.id} cannot be read any more ({err}); it was readable when the "
                           f"job scanned it: restore it and re-run, or re-run with --overwrite") from None
    if hashlib.sha1(data).hexdigest() != entry.sha1:
        raise InputChanged(f"{entry.id} changed while the job ran (sha1 differs from the scan); "
                           f"re-run with --overwrite to start over")
    try:
        jpg, _w, _h = encode(data, opts)
    except ImageRejected as err:
        rejected = classify_error(err)
        rejects.append({"source": entry.id, "class": entry.class_name, "reason": rejected.reason,
                        "detail": rejected.detail})
        return None
    parts = {"jpg": jpg, "cls": str(entry.label).encode("ascii"), "json": sample_json(entry)}
    if entry.labels is not None:  # "3,7,12": every label, the first one is also `cls`
        parts["labels"] = ",".join(str(label) for label in entry.labels).encode("ascii")
    return parts


def write_shard(out: str, split: str, filename: str, plan_hash: str, rows: list[list], options: dict) -> dict:
    """Write one complete shard, or confirm the one already there; return its receipt.

    Order of effects: temp file -> fsync -> rename to the final name -> receipt (atomic); on an object store
    temp file -> whole-object upload -> receipt object. A kill at any point leaves either nothing, an ignored
    temp file (an invisible unfinished upload), or a final tar without a receipt (rewritten, with the same
    bytes, on the next run). Files whose full decode fails (the scan let them through) are left
    out and reported in the receipt, so the shard's content is still a pure function of its rows.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    out_dir = storage.as_location(out)
    existing = valid_receipt(out_dir, split, filename, plan_hash)
    if existing is not None:
        return {**existing, "resumed": True, "node_id": _node_id(), "seconds": 0.0, "cpu_seconds": 0.0}
    try:
        return _write_new_shard(out_dir, split, filename, plan_hash, rows, options, start, cpu_start)
    except OSError as err:
        if err.errno in SPACE_ERRNOS:
            raise OutOfSpace(f"{err.strerror or err} writing {filename}", filename) from None
        raise


def _write_new_shard(out_dir: Location, split: str, filename: str, plan_hash: str, rows: list[list], options: dict,
                     start: float, cpu_start: float) -> dict:
    opts = ImageOptions(**options)
    entries = [Entry(*row) for row in rows]
    rejects, written = [], 0
    with storage.local_file_for(storage.join(out_dir, filename), ".tar") as tmp, open(tmp, "wb") as handle:
        stream = _HashingFile(handle)
        sink = ShardTarWriter(stream)
        for entry in entries:
            parts = _sample_parts(entry, opts, rejects)
            if parts is not None:
                sink.write(entry.key, parts)
                written += 1
        sink.close()
    receipt = {"filename": filename, "plan_hash": plan_hash, "num_samples": written, "bytes": stream.bytes,
               "sha256": stream.sha256.hexdigest(), "rejects": rejects, "node_id": _node_id(),
               "seconds": round(time.perf_counter() - start, 3),
               "cpu_seconds": round(time.process_time() - cpu_start, 3)}
    path = receipt_path(out_dir, split, filename)
    if not storage.is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(path, receipt, indent=None)
    return {**receipt, "resumed": False}
