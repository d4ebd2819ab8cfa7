"""List the inputs of a shard job: ImageFolder trees, per-class tar archives, manifests (``manifests.py``),
webdataset tars and parquet files (``webdataset.py``, ``parquet.py``; also from object storage URLs).

Listing is cheap (directory walks, tar headers, manifest rows, small label members, parquet label columns; no
image bytes are read) and gives every image a stable id, the id every later step keys on: its POSIX path
relative to SRC, ``<class>.tar/<member>`` for archive members, the path as written in the manifest,
``<ImageID>.jpg`` for OpenImages, ``<shard>.tar/<image member>`` for webdataset samples, or
``<file>.parquet/<row, zero-padded>`` for parquet rows. Files that can be judged without reading them
(non-image extension, class not in ``--classes``, file outside any class folder, a manifest path that does
not exist, a webdataset sample without image or label) are rejected here.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

from data_prep.limits import Limits, Rejected, bad_name, printable
from data_prep.sources.class_map import load_classes, packed_label_map
from data_prep.sources.folders import folder_classes, iter_folder, iter_folder_url, iter_tars, tar_archives
from data_prep.sources.labels import Packed
from data_prep.sources.manifests import (duplicate_path, is_openimages_csv, iter_manifest, list_manifest,
                                         list_openimages, load_class_file, sorted_classes)
from data_prep.sources.packed import PACKED_KINDS, detect as detect_packed
from data_prep.sources.parquet import stream_parquet
from data_prep.sources.remote import has_glob, is_url
from data_prep.sources.webdataset import peek_tar, stream_webdataset
from data_prep.spill import PARTITIONS, SpillWriter, order_key, sorted_spill

URL_KINDS = (*PACKED_KINDS, "folder", "tars")  # what an object-store SRC can be (manifests name local paths)

# torchvision.datasets.folder.IMG_EXTENSIONS, plus .gif (Pillow reads it); compared lower-case, so .JPG and
# .Jpeg count too. Anything else (.DS_Store, .txt, .json) is a "non_image_file".
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True, slots=True)
class InputFile:
    """One candidate image: where its bytes live and what it is labelled."""

    id: str            # stable, unique within the job
    class_name: str
    path: str          # file on disk, the tar archive or parquet file holding it; a URL when it holds "://"
    offset: int        # byte offset of the member's data inside the archive; -1 for a plain file; parquet: row
    size: int          # bytes; -1 when the file could not be stat'ed (rejected as missing_file or unreadable);
                       # images.PARQUET_ROW (-2) for a parquet row
    mtime: int         # modification time (ns for files and packed sources, s for per-class tar members);
                       # part of the fingerprint
    labels: tuple[str, ...] = ()   # multi-label sources: every known label, class_name == labels[0]; else ()


ListingReject = Rejected  # (id, class_name, reason, detail)


@dataclass
class Listing:
    kind: str                      # folder | tars | manifest | openimages | webdataset | parquet
    classes: list[str]
    inputs: list[InputFile]        # sorted by id; only files with an image extension and a known class
    rejects: list[ListingReject]   # judged without reading: name, class, label list, existence
    class_source: str              # "--classes FILE" or "SRC"
    fingerprint: str               # sha256 of the class list and every listed (id, class, size, mtime)
    multi_label: bool = False      # samples carry a label list (manifest `labels`, OpenImages)
    unknown_labels_dropped: int = 0  # labels not in --classes removed from images that kept a known one


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _detect_url(src: str, requested: str) -> str:
    """A URL SRC: webdataset or per-class tars, parquet files or an ImageFolder tree; a pattern: packed files."""
    kind = detect_packed(src) if requested == "auto" else requested
    if kind is None:
        raise UserError(f"SRC {src}: cannot tell what it holds (webdataset or per-class .tar files, .parquet "
                        f"files, class folders); give --source")
    allowed = PACKED_KINDS if has_glob(src) else URL_KINDS
    if kind not in allowed:
        raise UserError(f"SRC {src}: --source {kind} reads a local path; a {'pattern' if has_glob(src) else 'URL'} "
                        f"SRC is read with --source {' or '.join(allowed)}")
    return kind


def _detect_folder(src: Path) -> str:
    """Folder SRC: webdataset shards (even beside folders, e.g. our own OUT with _state/), per-class tars,
    parquet files, or an ImageFolder tree. Tars that look like neither layout need --source."""
    entries = list(os.scandir(src))
    tars = sorted(e.name for e in entries if e.is_file() and e.name.endswith(".tar") and not e.name.startswith("."))
    has_dirs = any(e.is_dir() for e in entries)
    if tars:
        layout = peek_tar(str(src / tars[0]))
        if layout == "webdataset":
            return "webdataset"
        if has_dirs:
            return "folder"
        if layout == "tars":
            return "tars"
        raise UserError(f"SRC {src}: cannot tell whether its .tar files are webdataset shards or per-class "
                        f"archives (looked at {tars[0]}); give --source webdataset or --source tars")
    if not has_dirs and any(e.is_file() and e.name.lower().endswith(".parquet") for e in entries):
        return "parquet"
    return "folder"


def detect_kind(src, requested: str) -> str:
    if is_url(src) or has_glob(src):
        return _detect_url(str(src), requested)
    src = Path(src)
    if not src.exists():
        raise UserError(f"SRC {src} does not exist; give an ImageFolder tree, a folder of <class>.tar files, "
                        f"a .csv/.jsonl manifest, or webdataset .tar / .parquet files")
    if requested != "auto":
        kind = requested
    elif src.is_file():
        suffix = src.suffix.lower()
        kind = {".tar": "webdataset", ".parquet": "parquet"}.get(suffix) or (
            "openimages" if is_openimages_csv(src) else "manifest")
    else:
        kind = _detect_folder(src)
    if kind in PACKED_KINDS:
        pass  # a folder, one file or a pattern: packed.list_files checks what it finds
    elif kind == "manifest":
        if not src.is_file() or src.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"SRC {src}: a manifest must be a .csv or .jsonl file with 'path' and 'label'")
    elif kind == "openimages":
        if not src.is_file() or not is_openimages_csv(src):
            raise UserError(f"SRC {src}: an OpenImages annotation file must be a .csv whose header is "
                            f"ImageID,Source,LabelName,Confidence")
    elif not src.is_dir():
        raise UserError(f"SRC {src} is a file; --source {kind} needs a folder")
    return kind


def _single(rows) -> list[tuple]:
    """Label tuples -> one class name per row (single-label sources keep their rows and fingerprint)."""
    return [(r[0], r[1][0], *r[2:]) if isinstance(r[1], tuple) else r for r in rows]


def _check_flags(src, kind: str, images: Path | None, label_field: str | None, label_map: Path | None) -> None:
    if images is not None and kind != "openimages":
        raise UserError(f"--images {images} is only for an OpenImages annotation file "
                        f"(ImageID,Source,LabelName,Confidence); SRC {src} is a {kind} source")
    if kind not in PACKED_KINDS and (label_field is not None or label_map is not None):
        flag = "--label-field" if label_field is not None else "--label-map"
        raise UserError(f"{flag} is for webdataset and parquet sources; SRC {src} is a {kind} source")


def _list_any(src, kind: str, images: Path | None, label_field: str | None, label_map: Path | None) -> Packed:
    """Classes found, rows, multi_label (and the rejects a packed source judged itself) of any kind of SRC, all
    in memory (list_inputs); rows carry a class name, or a label tuple in multi-label sources."""
    if kind == "manifest":  # read whole: its duplicate-path check and class order are list_manifest's
        _check_flags(src, kind, images, label_field, label_map)
        classes, rows, multi = list_manifest(src)
        return Packed(classes, rows if multi else _single(rows), multi)
    rows, found = _stream_any(src, kind, images, label_field, label_map, {})
    found.rows = [row for row, _line in rows]
    found.rejects = [*found.rejects, *(tuple(r) for r in found.rows if isinstance(r, Rejected))]
    found.rows = [r for r in found.rows if not isinstance(r, Rejected)]
    if not found.multi_label:
        found.rows = _single(found.rows)
    return found


def _judge(row: tuple, known: set[str], classes_file: Path | None, from_manifest: bool, check_name: bool = True,
           limits: Limits = Limits()):
    """One listed row -> (InputFile, None, dropped labels) or (None, ListingReject, 0)."""
    file_id, label, path, offset, size, mtime = row
    multi = isinstance(label, tuple)
    first = (label[0] if label else None) if multi else label
    if label is None:
        return None, ListingReject(file_id, None, "no_class", "file is not inside a class folder"), 0
    if size > limits.max_bytes:  # from stat, the tar header or the object listing: nothing is read
        return None, ListingReject(file_id, first, "too_large",
                                   f"{size:,} bytes > --max-bytes {limits.max_bytes:,}"), 0
    if multi and len(label) > limits.max_labels:
        return None, ListingReject(file_id, None, "too_many_labels",
                                   f"{len(label):,} labels > --max-labels {limits.max_labels:,}"), 0
    if any(len(name) > limits.max_label_bytes for name in (label if multi else (label,))):
        return None, ListingReject(file_id, None, "label_too_large", f"a label is longer than --max-label-bytes "
                                                                     f"{limits.max_label_bytes:,}"), 0
    if check_name and not is_image_name(file_id):
        return None, ListingReject(file_id, first, "non_image_file", "file name has no image extension"), 0
    if multi and not label:
        return None, ListingReject(file_id, None, "no_label", "no positive label (Confidence 1) for it"), 0
    kept = tuple(n for n in label if n in known) if multi else ((label,) if label in known else ())
    if not kept:
        names = f"labels {list(label)} are" if multi and len(label) > 1 else f"class {first!r} is"
        where = classes_file if classes_file is not None else "the class list of SRC"
        return None, ListingReject(file_id, first, "unknown_class", f"{names} not in {where}"), 0
    if from_manifest and size < 0 and not os.path.exists(path):
        return None, ListingReject(file_id, kept[0], "missing_file", f"no such file {path}"), 0
    item = InputFile(file_id, kept[0], path, offset, size, mtime, kept if multi else ())
    return item, None, (len(label) - len(kept)) if multi else 0


def list_inputs(src: Path | str, kind: str, classes_file: Path | None, images: Path | None = None,
                label_field: str | None = None, label_map: Path | None = None) -> Listing:
    """All inputs of SRC, sorted by id, with the rejects that need no reading.

    SRC is a Path or a str; a str holding "://" is an fsspec URL (webdataset and parquet sources only).
    """
    kind = detect_kind(src, kind)
    found = _list_any(src, kind, images, label_field, label_map)
    multi = found.multi_label
    classes = load_class_file(classes_file) if classes_file is not None else found.classes
    known = set(classes)
    inputs, dropped = [], found.dropped
    rejects = [ListingReject(*r) for r in found.rejects]
    digest = hashlib.sha256(json.dumps([kind, classes]).encode())
    for row in sorted(found.rows, key=lambda r: r[0]):
        file_id, label, _path, _offset, size, mtime = row
        digest.update(json.dumps([file_id, list(label) if multi else label, size, mtime]).encode())
        item, reject, lost = _judge(row, known, classes_file, kind in ("manifest", "openimages"),
                                    check_name=kind not in PACKED_KINDS)
        dropped += lost
        if item is not None:
            inputs.append(item)
        else:
            rejects.append(reject)
    if not inputs:
        if kind in PACKED_KINDS:
            first = f"; first: {rejects[0].id}: {rejects[0].reason} ({rejects[0].detail})" if rejects else ""
            raise UserError(f"SRC {src}: no usable samples ({len(rejects)} rejected{first})")
        raise UserError(f"SRC {src}: no image files found ({len(rejects)} other files); "
                        f"expected {'images in class folders' if kind == 'folder' else 'image entries'}")
    rejects.sort(key=lambda r: r.id)
    class_source = f"--classes {classes_file}" if classes_file else (found.class_source or "SRC")
    return Listing(kind=kind, classes=classes, inputs=inputs, rejects=rejects, class_source=class_source,
                   fingerprint=digest.hexdigest(), multi_label=multi, unknown_labels_dropped=dropped)


@dataclass
class PartitionedListing:
    """The summary of a listing whose rows went to partition files (``list_partitioned``): O(partitions)."""

    kind: str
    classes: list[str]
    class_source: str
    fingerprint: str               # see list_partitioned
    multi_label: bool
    unknown_labels_dropped: int
    counts: list[int]              # inputs per partition
    listed: int                    # rows listed (inputs + rejects)
    input_bytes: int               # the inputs' sizes (what is known of them: parquet rows count 0)
    rejected: int
    non_image_files: int
    directory: Path                # inputs-PPP.jsonl (each sorted by order key) and rejects.jsonl

    @property
    def num_inputs(self) -> int:
        return sum(self.counts)

    def inputs_path(self, part: int) -> Path:
        return self.directory / f"inputs-{part:03d}.jsonl"

    @property
    def rejects_path(self) -> Path:
        return self.directory / "rejects.jsonl"


def _stream_any(src, kind: str, images: Path | None, label_field: str | None, label_map: Path | None,
                seen: dict, limits: Limits = Limits()):
    """(rows iterator of (row, line or None), Packed without rows); the Packed's classes and multi_label are
    final once the rows are exhausted. Every kind streams but OpenImages (its per-image label groups are
    built first)."""
    _check_flags(src, kind, images, label_field, label_map)
    if kind == "manifest":
        found = Packed([], [], False)
        return ((row, line) for row, line in iter_manifest(Path(src), seen, limits)), found
    if kind == "folder" and not is_url(src):
        classes = folder_classes(Path(src))
        return ((row, None) for row in iter_folder(Path(src), classes)), Packed(classes, [], False)
    if kind == "folder":
        found = Packed([], [], False)
        return ((row, None) for row in iter_folder_url(src, found)), found
    if kind == "tars":
        classes, archives = tar_archives(src)
        return ((row, None) for row in iter_tars(archives, classes)), Packed(classes, [], False)
    if kind in PACKED_KINDS:  # rows carry label tuples: list_partitioned takes the first when single-label
        rows, found = (stream_webdataset if kind == "webdataset" else stream_parquet)(src, label_field, label_map,
                                                                                      limits)
        return ((row, None) for row in rows), found
    found = Packed(*list_openimages(src, images, limits))
    rows, found.rows = found.rows, []
    return ((row, None) for row in rows), found


class RejectLog:
    """The listing's rejects, written to ``rejects.jsonl`` as they are judged; keeps counts and the first."""

    def __init__(self, path: Path):
        self.handle = open(path, "w", encoding="utf-8")
        self.count = self.non_image = self.streamed = 0
        self.first: tuple | None = None

    def __call__(self, r: Rejected) -> None:
        self.count += 1
        self.non_image += r.reason == "non_image_file"
        if self.first is None or r.id < self.first[0]:
            self.first = tuple(r)
        self.handle.write(json.dumps({"source": r.id, "class": r.class_name, "reason": r.reason,
                                      "detail": r.detail}, ensure_ascii=False) + "\n")


def raw_entry(row, line, seed: int):
    """One listed row -> (partition, raw spill row), or a Rejected (a lister's own, or a name that cannot be an
    id: not UTF-8, a NUL). Shared by the one-process listing and the listing in parts (``sources.parts``)."""
    if isinstance(row, Rejected):
        return Rejected(printable(row.id), row.class_name, row.reason, row.detail)
    why = bad_name(row[0]) or bad_name(str(row[2]))
    labels = row[1] if isinstance(row[1], tuple) else (row[1],)
    if why is None and any(isinstance(n, str) and bad_name(n) for n in labels):
        return Rejected(printable(row[0]), None, "bad_label", "a label is not valid UTF-8 text or holds a NUL")
    if why is not None:
        return Rejected(printable(row[0]), None, "bad_name", why)
    key = order_key(row[0], seed)
    label = list(row[1]) if isinstance(row[1], tuple) else row[1]
    return key[0], [key.hex(), line, row[0], label, row[2], row[3], row[4], row[5]]


def _spill_raw(rows, seed: int, directory: Path, log: RejectLog, progress) -> SpillWriter:
    """Rows -> raw spill files by order key; a lister's Rejected row or a name that cannot be an id goes to the
    reject log instead: one hostile row never stops the listing."""
    raw = SpillWriter(directory, "raw")
    try:
        for row, line in rows:
            if progress is not None:
                progress.update(1)
            entry = raw_entry(row, line, seed)
            if isinstance(entry, Rejected):
                log.streamed += 1
                log(entry)
            else:
                raw.add(*entry)
    finally:
        rows.close()  # a lister stopped by an error releases its threads and open files now, not at collection
        raw.close()
    return raw


def list_partitioned(src: Path | str, kind: str, classes_file: Path | None, seed: int, directory: Path,
                     images: Path | None = None, label_field: str | None = None, label_map: Path | None = None,
                     progress=None, sort_rows: int | None = None, limits: Limits | None = None
                     ) -> PartitionedListing:
    """``list_inputs`` without holding the listing: rows stream into ``spill.PARTITIONS`` spill files by their
    order key; then each partition alone is sorted, checked and judged into ``inputs-PPP.jsonl``. No sort
    holds more than ``sort_rows`` rows (``spill.SORT_ROWS``; a bigger partition is split by the key's next byte,
    ``spill.sorted_spill``), so the driver's memory does not grow with the listing.

    Fingerprint: sha256 of (kind, class list, row count, the sum mod 2**256 of sha256(id, label, size, mtime)
    over all rows). The sum does not depend on the order the rows were listed in or on the partitioning, and
    any changed, added or removed row changes it (up to a 2**-256 chance). It differs from ``list_inputs``'
    running hash (the listing is never in one order in one place), so an OUT written before partitioned
    planning is seen as made from other inputs: re-run with --overwrite.
    """
    kind = detect_kind(src, kind)
    limits = limits or Limits()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: dict = {}
    label_map = packed_label_map(classes_file, label_map, kind in PACKED_KINDS)
    rows, found = _stream_any(src, kind, images, label_field, label_map, seen, limits)
    log = RejectLog(directory / "rejects.jsonl")
    try:
        raw = _spill_raw(rows, seed, directory, log, progress)
        if kind == "manifest":
            found.classes, found.multi_label = sorted_classes(seen.get("names", ())), bool(seen.get("multi"))
        return finish_listing(src, kind, classes_file, found, raw, log, directory, sort_rows, limits,
                              [ListingReject(*r) for r in found.rejects], len(found.rejects))
    finally:
        log.handle.close()


def finish_listing(src, kind: str, classes_file: Path | None, found: Packed, raw: SpillWriter, log: RejectLog,
                   directory: Path, sort_rows: int | None, limits: Limits, early_rejects, early_count: int,
                   judge=None) -> PartitionedListing:
    """Raw spill files (every row listed, by order key) -> the judged listing: the class list, the lister's own
    rejects (``early_rejects``, an iterable of ``early_count``), each partition sorted, checked and judged --
    here, or by ``judge`` (``_judge_partitions``' signature and result: ``shard.judge_tasks`` runs it on Ray)."""
    listed_classes, mapping = load_classes(classes_file) if classes_file is not None else (None, None)
    classes = listed_classes if classes_file is not None else found.classes
    if len(classes) > limits.max_classes:
        raise UserError(f"SRC {src}: {len(classes):,} classes > --max-classes {limits.max_classes:,}; check "
                        f"the labels (a label per image?), or raise --max-classes")
    for r in early_rejects:
        log(r)
    inputs_out, hashed, total, dropped, input_bytes = (judge or _judge_partitions)(
        src, raw, kind, classes, classes_file, found, sort_rows, limits, log, directory,
        mapping=mapping if kind not in PACKED_KINDS else None)
    mapped = [[list(p) for p in mapping.pairs]] if mapping is not None else []  # a changed mapping: other inputs
    fingerprint = hashlib.sha256(json.dumps([kind, classes, hashed, f"{total:064x}", *mapped]).encode()).hexdigest()
    if not sum(inputs_out.counts):
        first = f"; first: {log.first[0]}: {log.first[2]} ({log.first[3]})" if log.first else ""
        if kind in PACKED_KINDS:
            raise UserError(f"SRC {src}: no usable samples ({log.count} rejected{first})")
        raise UserError(f"SRC {src}: no image files found ({log.count} other files{first}); "
                        f"expected {'images in class folders' if kind == 'folder' else 'image entries'}")
    class_source = f"--classes {classes_file}" if classes_file else (found.class_source or "SRC")
    return PartitionedListing(kind, classes, class_source, fingerprint, found.multi_label, dropped,
                              inputs_out.counts, hashed + log.streamed + early_count, input_bytes, log.count,
                              log.non_image, directory)


def _judge_partitions(src, raw: SpillWriter, kind: str, classes: list[str], classes_file: Path | None,
                      found: Packed, sort_rows: int | None, limits: Limits, log: RejectLog, directory: Path,
                      parts=range(PARTITIONS), mapping=None):
    """Each raw partition (of ``parts``), sorted, hashed into the fingerprint sum and judged into
    ``inputs-PPP.jsonl``: (inputs spill, rows hashed, fingerprint sum, labels dropped, input bytes). ``mapping``:
    a --classes mapping (``class_map.ClassMapping``) applied to folder, tar and manifest labels before judging."""
    multi, known = found.multi_label, set(classes)
    check_name, from_manifest = kind not in PACKED_KINDS, kind in ("manifest", "openimages")
    hashed, total, dropped, input_bytes = 0, 0, found.dropped, 0
    inputs_out = SpillWriter(directory, "inputs")
    try:
        for part in parts:
            part_rows = sorted_spill(raw.path(part), raw.counts[part],
                                     lambda r: (r[0], r[1] or 0),  # order key; a repeated path: by line
                                     sort_rows)
            previous = None
            for key_hex, line, file_id, label, path, offset, size, mtime in part_rows:
                if previous is not None and previous[0] == file_id:
                    raise duplicate_path(Path(src), file_id, previous[1], line)
                previous = (file_id, line)
                if isinstance(label, list):
                    label = tuple(label) if multi else label[0]
                digest = hashlib.sha256(json.dumps([file_id, list(label) if multi else label, size, mtime])
                                        .encode()).digest()
                total = (total + int.from_bytes(digest, "big")) % (1 << 256)
                hashed += 1
                if mapping is not None:
                    label = mapping.apply(label)
                item, bad, lost = _judge((file_id, label, path, offset, size, mtime), known, classes_file,
                                         from_manifest, check_name=check_name, limits=limits)
                dropped += lost
                if item is None:
                    log(bad)
                    continue
                input_bytes += max(item.size, 0)
                inputs_out.add(part, [key_hex, item.id, item.class_name, item.path, item.offset, item.size,
                                      list(item.labels) if multi else None])
            raw.path(part).unlink(missing_ok=True)
    finally:
        inputs_out.close()
    return inputs_out, hashed, total, dropped, input_bytes
