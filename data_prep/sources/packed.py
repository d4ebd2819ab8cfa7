"""Sources that are already packed: webdataset tars and parquet files of image bytes, local or in object storage.

SRC is a folder or object-store prefix (``s3://bucket/prefix``; any fsspec URL), one file, or a glob pattern in
its last part (``shards/train-*.tar``, ``data/train-*.parquet``): the files directly inside, sorted by name,
hidden ones skipped. A str holding "://" is a URL; everything else is a local path. Local and URL sources go
through the same fsspec listing code, so the ``file://`` tests exercise what ``s3://`` runs.

Addresses (what ``images.read_bytes`` gets back in the scan and write tasks):

* a webdataset sample is addressed like a per-class tar member: (tar, offset of the image member's data,
  its size), read in place -- one ranged GET per image on object storage, never a local copy.
* a parquet image is not byte-addressable (values sit inside compressed pages), so its address is (parquet
  file, row index, ``images.PARQUET_ROW``); ``read_parquet_image`` reads the image column of that row's row
  group once and keeps it (see ``_RowGroupCache`` for why that is the unit).

Listing reads tar headers plus the small label members (json/cls/txt), and only the label column of parquet
files. Samples are grouped by webdataset's rule (key = member path up to the first dot of its base name;
consecutive members with the same key form a sample); the image is the sample's first member with an image
extension. Label values are turned into class names by ``_LabelResolver``; samples without an image or a
usable label are returned as rejects (they reach rejects.jsonl), never dropped silently.
"""
from __future__ import annotations

import datetime
import itertools
import json
import re
import tarfile
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

from data_prep.images import PARQUET_ROW, ImageRejected
from data_prep.sources.manifests import load_label_map, sorted_classes

PACKED_KINDS = ("webdataset", "parquet")
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff", "gif"})
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")  # img2dataset: jpg/png/webp; Hugging Face: image
LABEL_COLUMNS = ("label", "labels", "cls")                       # parquet default label columns, in this order
_LABEL_MEMBER_LIMIT = 1 << 20   # a label member (json/cls/txt) bigger than this is not read at listing
_PEEK_MEMBERS = 32              # tar members looked at to tell webdataset shards from per-class archives
_GLOB = re.compile(r"[*?\[]")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members like __index__ are not samples
_INT = re.compile(r"-?[0-9]+")
_LIST_THREADS = 16              # object stores: files listed concurrently (each listing waits on the network)
_TAR_BLOCK = 8 << 20            # ranged GET size when walking a remote tar's headers


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location


def has_glob(location) -> bool:
    return bool(_GLOB.search(str(location).rstrip("/").rsplit("/", 1)[-1]))


def _fs(location: str):
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


def _first_line(err: BaseException) -> str:
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
    fs, path = _fs(text)
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
        raise UserError(f"SRC {text}: cannot list it ({_first_line(err)}); check the path, the credentials "
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
    fs, path = _fs(text)
    base = path.rstrip("/")
    try:
        infos = list(fs.find(base, detail=True).values())
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types here; all mean "cannot list"
        raise UserError(f"SRC {text}: cannot list it ({_first_line(err)}); check the path, the credentials "
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
    fs, path = _fs(text)
    base = path.rstrip("/")
    try:
        infos = fs.ls(base, detail=True)
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types here; all mean "cannot list"
        raise UserError(f"SRC {text}: cannot list it ({_first_line(err)}); check the path, the credentials "
                        f"(AWS_* variables for s3://) and the endpoint") from None
    def leaf(info: dict) -> str:
        return info["name"].rstrip("/").rsplit("/", 1)[-1]

    folders = sorted(leaf(i) for i in infos if i.get("type") == "directory")
    yield None, sorted((PackedFile(leaf(i), fs.unstrip_protocol(i["name"]), int(i.get("size") or 0), _mtime(i))
                        for i in infos if i.get("type") == "file"), key=lambda f: f.name)
    prefix = fs.unstrip_protocol(base)
    listed = _iter_files(lambda folder: walk_files(f"{prefix}/{folder}")[1], folders, url=True)
    for folder, files in zip(folders, listed):
        yield folder, [PackedFile(f"{folder}/{f.name}", f.location, f.size, f.mtime) for f in files]


def open_location(location: str, block_size: int = _TAR_BLOCK):
    """A local file, or a URL read front to back in ranged GETs of `block_size` with read-ahead."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = _fs(location)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


# ----------------------------------------------------------------------------------------------- reading

def read_range(location: str, offset: int, size: int) -> bytes:
    """A whole object (offset < 0) or `size` bytes at `offset` of a URL: one ranged GET, no local copy."""
    fs, path = _fs(location)
    if offset < 0:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + size)


def image_column(schema, where: str) -> tuple[str, str | None]:
    """(column, struct field or None) holding the image bytes: the first binary column named like an image
    (img2dataset's jpg/png/webp, ``image``), else the first struct with a binary ``bytes`` field (Hugging Face
    ``Image``: {bytes, path}). Listing and reading call this on the same schema, so they agree."""
    import pyarrow as pa

    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    for f in schema:
        if binary(f.type) and f.name.lower() in IMAGE_COLUMNS:
            return f.name, None
    for f in schema:
        if pa.types.is_struct(f.type):
            inner = f.type.field("bytes") if f.type.get_field_index("bytes") >= 0 else None
            if inner is not None and binary(inner.type):
                return f.name, "bytes"
    columns = ", ".join(f"{f.name} ({f.type})" for f in schema)
    raise UserError(f"parquet {where}: no image column; expected a binary column named "
                    f"{'/'.join(IMAGE_COLUMNS)} or a struct with 'bytes' (Hugging Face Image); columns: {columns}")


class _RowGroupCache:
    """The image column of recently read row groups, per process, up to a byte budget.

    Why a row group: it is the smallest unit pyarrow reads (no per-row access without a page index, which
    writers do not write by default). The scan reads rows in id order (``file/row`` with zero-padded rows), so
    one read serves a whole group. The write tasks read rows in shuffled order, so each image there costs a
    row-group read: with the 100-row groups of img2dataset and Hugging Face files that is about 100x the bytes
    of the image, cheap locally, bandwidth on object storage (see the README).
    """

    def __init__(self, budget: int = 256 << 20, max_files: int = 8):
        self.budget, self.max_files = budget, max_files
        self.files: OrderedDict[str, tuple] = OrderedDict()    # location -> (ParquetFile, handle, column, starts)
        self.groups: OrderedDict[tuple, object] = OrderedDict()  # (location, group) -> pyarrow array of bytes
        self.bytes = 0

    def _file(self, location: str) -> tuple:
        if location in self.files:
            self.files.move_to_end(location)
            return self.files[location]
        import pyarrow.parquet as pq

        handle = open_location(location, block_size=1 << 20) if is_url(location) else None
        parquet = pq.ParquetFile(handle if handle is not None else location)
        column = image_column(parquet.schema_arrow, location)
        starts, total = [], 0
        for i in range(parquet.metadata.num_row_groups):
            starts.append(total)
            total += parquet.metadata.row_group(i).num_rows
        self.files[location] = (parquet, handle, column, starts + [total])
        while len(self.files) > self.max_files:
            _loc, (old, old_handle, *_rest) = self.files.popitem(last=False)
            old.close()
            if old_handle is not None:
                old_handle.close()
        return self.files[location]

    def image(self, location: str, row: int) -> bytes | None:
        parquet, _handle, (name, inner), starts = self._file(location)
        if not 0 <= row < starts[-1]:
            raise ImageRejected("unreadable", f"row {row} is past the file's {starts[-1]} rows")
        group = next(i for i in range(len(starts) - 1) if starts[i] <= row < starts[i + 1])
        key = (location, group)
        if key not in self.groups:
            values = parquet.read_row_group(group, columns=[name]).column(0).combine_chunks()
            if inner is not None:
                values = values.field(inner)
            self.groups[key] = values
            self.bytes += values.nbytes
            while self.bytes > self.budget and len(self.groups) > 1:
                _old, dropped = self.groups.popitem(last=False)
                self.bytes -= dropped.nbytes
        self.groups.move_to_end(key)
        return self.groups[key][row - starts[group]].as_py()


_ROW_GROUPS = _RowGroupCache()  # one per process: Ray runs one task at a time in a worker


def read_parquet_image(location: str, row: int) -> bytes:
    """The image bytes of one parquet row; raises ImageRejected for a row without bytes or a damaged file."""
    try:
        data = _ROW_GROUPS.image(location, row)
    except (ImageRejected, FileNotFoundError, UserError):
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/... for a damaged file
        raise ImageRejected("unreadable", f"parquet row {row}: {_first_line(err)}") from None
    if data is None:
        raise ImageRejected("unreadable", f"parquet row {row} holds no image bytes (a null, or only a path)")
    return data


# ----------------------------------------------------------------------------------------------- labels

@dataclass
class Packed:
    """What a lister hands to sources.list_inputs (every kind; packed sources also judge rejects themselves)."""

    classes: list[str]
    rows: list[tuple] = field(default_factory=list)     # (id, labels tuple, location, offset, size, mtime)
    multi_label: bool = False
    rejects: list[tuple] = field(default_factory=list)  # (id, class name or None, reason, detail)
    dropped: int = 0                                    # multi-label: labels the map or class list did not know
    class_source: str = ""                              # where the class names came from, for messages


class _LabelResolver:
    """Raw label values -> class names.

    * An int indexes the source's class names when the source has them (Hugging Face ClassLabel names in the
      parquet metadata; our own shards' _info.json); without them it is the class name "3". Text members
      (cls, txt) holding digits are ints; a JSON string is always a name.
    * ``--label-map`` then maps the names (or the int text); a name it does not map is unknown.
    * A list is a multi-label value: unknown labels are dropped and counted; nothing left is unknown_class.
    """

    def __init__(self, label_map: Path | None):
        self.map = load_label_map(label_map) if label_map is not None else None
        self.map_name = f"--label-map {label_map}"

    def names(self, raw, names: list[str] | None, names_from: str, hf: bool):
        """(kept names, dropped count, None) or (None, 0, (reason, detail))."""
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            return None, 0, ("no_label", "empty label list")
        kept, unknown = [], []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str)
                                                                                and not value.strip()):
                return None, 0, ("no_label", f"label {value!r} is not a class name or integer")
            if isinstance(value, int) and names is not None:
                if hf and value == -1:  # Hugging Face's "no label" (test splits)
                    return None, 0, ("no_label", "label -1 (no label)")
                if not 0 <= value < len(names):
                    unknown.append(f"{value} (not an index of the {len(names)} class names of {names_from})")
                    continue
                value = names[value]
            text = str(value).strip()
            if self.map is not None:
                if text not in self.map:
                    unknown.append(f"{text!r} (not in {self.map_name})")
                    continue
                text = self.map[text]
            kept.append(text)
        kept = list(dict.fromkeys(kept))
        if not kept:
            return None, 0, ("unknown_class", f"label {', '.join(unknown)}")
        return tuple(kept), len(unknown), None


def _resolved(samples, resolver: _LabelResolver, names: list[str] | None, names_from: str, out: Packed,
              early: list[tuple]):
    """Rows (id, class names tuple, location, offset, size, mtime) of `samples` (id, raw label, location,
    offset, size, mtime, hf), yielded as they come. Once they are exhausted `out` holds multi_label, dropped,
    the class list and the rejects: `early` (what the lister judged itself, complete by then) first, then the
    labels that resolve to no class."""
    late, found = [], set()
    for sample_id, raw, location, offset, size, mtime, hf in samples:
        out.multi_label |= isinstance(raw, list)
        kept, dropped, problem = resolver.names(raw, names, names_from, hf)
        if problem is not None:
            late.append((sample_id, None, *problem))
            continue
        out.dropped += dropped
        found.update(kept)
        yield (sample_id, kept, location, offset, size, mtime)
    out.rejects = [*early, *late]
    if names is not None and resolver.map is None:
        out.classes = list(names)  # the source's own order and complete list: class indices stay as they were
    else:
        out.classes = sorted_classes(found)


def _iter_files(fn, files: list[PackedFile], url: bool):
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


# ----------------------------------------------------------------------------------------------- webdataset

def split_member(name: str) -> tuple[str | None, str]:
    """webdataset's base_plus_ext: ("dir/key", "ext") with ext after the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _image_ext(ext: str) -> bool:
    return ext.lower().rsplit(".", 1)[-1] in IMAGE_EXTS


def peek_tar(location: str) -> str | None:
    """'webdataset' if the first members group into samples (a key with an image and another member next to
    it), 'tars' if every key has one member (per-class archives: plain image files), None if unsure."""
    keys: list[tuple[str, str]] = []
    try:
        with open_location(location, block_size=1 << 20) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if member.isfile() and not _META.search(member.name):
                    keys.append(split_member(member.name))
                if len(keys) >= _PEEK_MEMBERS:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return None
    if not keys:
        return None
    groups: dict[str, list[str]] = {}
    for key, ext in keys:
        if key is not None:
            groups.setdefault(key, []).append(ext)
    if any(len(exts) > 1 and any(_image_ext(e) for e in exts) for exts in groups.values()):
        return "webdataset"
    return "tars" if all(len(exts) == 1 for exts in groups.values()) else None


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
    fs, path = _fs(str(src))
    try:
        return "folder" if any(i.get("type") == "directory" for i in fs.ls(path, detail=True)) else None
    except Exception:  # noqa: BLE001 - not listable: list_files said so already, or it is a single object
        return None


def _info_classes(base: str, files: list[PackedFile]) -> tuple[list[str] | None, str]:
    """Class names of our own shards: the _info.json beside them, for the split whose shards are listed."""
    location = f"{base}/_info.json"
    try:
        fs, path = _fs(location)
        info = json.loads(fs.cat_file(path))
    except (OSError, ValueError, UserError):
        return None, ""
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict):
        return None, ""
    names = {f.name for f in files}
    hit = sorted(s for s, e in splits.items() if isinstance(e, dict) and names & set(e.get("filenames") or []))
    if len(hit) > 1:
        raise UserError(f"SRC {base} holds the shards of splits {', '.join(hit)}; reshard one split at a time, "
                        f"e.g. SRC {base}/{hit[0]}-*.tar")
    classes = splits[hit[0]].get("classes") if hit else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return None, ""
    return list(classes), location


def _text(data: bytes):
    text = data.decode("utf-8", errors="replace").strip()
    return int(text) if _INT.fullmatch(text) else text


def _json(parts: dict[str, bytes]):
    try:
        return json.loads(parts["json"]) if "json" in parts else None
    except ValueError:
        return None


def _ours(meta) -> bool:
    """A .json written by data_prep (tasks.sample_json): it names the class, so no map is needed."""
    return isinstance(meta, dict) and isinstance(meta.get("class"), str) and "sha1" in meta and "source" in meta


_MISSING = object()


def _raw_label(parts: dict[str, bytes], field: str | None):
    """The sample's raw label: (value, None), or (_MISSING, why). See README for the rules."""
    if field is None:
        meta = _json(parts)
        if _ours(meta):
            return (meta["classes"] if isinstance(meta.get("classes"), list) else meta["class"]), None
        if "cls" in parts:
            return _text(parts["cls"]), None
        return _MISSING, "no .cls member (name the label with --label-field)"
    if field in parts and field != "json":
        if field == "labels":  # our multi-label member: "3,7,12"
            return [_text(p.encode()) for p in parts[field].decode("utf-8", "replace").split(",")], None
        return _text(parts[field]), None
    if "json" not in parts:
        return _MISSING, f"no .{field} member and no .json member"
    meta = _json(parts)
    if not isinstance(meta, dict):
        return _MISSING, "its .json member is not a JSON object"
    if field not in meta:
        return _MISSING, f"no .{field} member and no key {field!r} in its .json"
    return meta[field], None


def _tar_samples(tar: PackedFile, field: str | None, seen: dict) -> tuple[list[tuple], list[tuple]]:
    """(samples, rejects) of one webdataset tar; `seen` collects member extensions and json keys for messages."""
    wanted = {"json", "cls", "txt", "labels"} | ({field} if field else set())
    groups: list[tuple[str, list]] = []
    try:
        with open_location(tar.location) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if not member.isfile() or _META.search(member.name):
                    continue
                key, ext = split_member(member.name)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:  # webdataset groups consecutive members by key
                    groups.append((key, []))
                data = None
                if ext.lower() in wanted and member.size <= _LABEL_MEMBER_LIMIT:
                    data = archive.extractfile(member).read()  # in memory; nothing is written to disk
                groups[-1][1].append((ext, member, data))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"SRC archive {tar.location} cannot be read as an uncompressed tar ({_first_line(err)}); "
                        f"repair or remove it") from None
    samples, rejects, ids = [], [], set()
    for key, members in groups:
        parts = {ext.lower(): data for ext, _m, data in members if data is not None}
        seen.setdefault("members", set()).update(ext.lower() for ext, _m, _d in members)
        meta = _json(parts)
        if isinstance(meta, dict):
            seen.setdefault("json", set()).update(list(meta)[:50])
        image = next((m for ext, m, _d in members if _image_ext(ext)), None)
        sample_id = f"{tar.name}/{image.name if image is not None else key}"
        if image is None:
            exts = ", ".join(sorted({ext for ext, _m, _d in members}))
            rejects.append((sample_id, None, "no_image", f"sample {key!r} has no image member (members: {exts})"))
            continue
        if sample_id in ids:
            rejects.append((sample_id, None, "duplicate_key", f"member {image.name!r} appears twice in {tar.name}"))
            continue
        ids.add(sample_id)
        raw, why = _raw_label(parts, field)
        if raw is _MISSING:
            rejects.append((sample_id, None, "no_label", why))
            continue
        samples.append((sample_id, raw, tar.location, image.offset_data, image.size, tar.mtime, False))
    return samples, rejects


def stream_webdataset(src, label_field: str | None, label_map: Path | None):
    """(rows, Packed): rows as each tar's headers and label members are read; the Packed's classes, rejects
    and multi_label are final once the rows are exhausted."""
    base, tars = list_files(src, ".tar")
    if not tars:
        raise UserError(f"SRC {src} has no .tar files")
    resolver = _LabelResolver(label_map)
    names, names_from = _info_classes(base, tars)
    out = Packed(classes=[], class_source=names_from or "SRC")
    seen: dict = {}
    early: list[tuple] = []

    def samples():
        count = 0
        for found, rejects in _iter_files(lambda t: _tar_samples(t, label_field, seen), tars, is_url(str(src))):
            early.extend(rejects)
            count += len(found)
            yield from found
        if not count and any(r[2] == "no_label" for r in early):
            members = ", ".join(sorted(seen.get("members", ()))) or "none"
            keys = ", ".join(sorted(seen.get("json", ()))) or "none"
            what = f"--label-field {label_field}" if label_field else "a .cls member or data_prep's .json"
            raise UserError(f"SRC {src}: no sample has a label ({what}); members seen: {members}; json keys seen: "
                            f"{keys}; name the label with --label-field KEY")

    return _resolved(samples(), resolver, names, out.class_source, out, early), out


# ----------------------------------------------------------------------------------------------- parquet

def _hf_class_names(schema, column: str) -> list[str] | None:
    """ClassLabel names from the ``huggingface`` schema metadata (datasets' Features), if the column has them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") in ("Sequence", "List", "LargeList"):
        feature = feature.get("feature")
    if isinstance(feature, list) and feature:  # datasets' shorthand [ClassLabel(...)] for a list feature
        feature = feature[0]
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _label_type_ok(t) -> bool:
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _parquet_samples(part: PackedFile, label_field: str | None) -> tuple[list[tuple], list[str] | None]:
    import pyarrow.parquet as pq

    try:
        with open_location(part.location, block_size=1 << 20) as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            image_column(schema, part.location)
            names = [f.name for f in schema]
            column = label_field or next((c for c in LABEL_COLUMNS if c in names), None)
            if column is None or column not in names:
                want = f"column {label_field!r}" if label_field else f"label column ({'/'.join(LABEL_COLUMNS)})"
                raise UserError(f"parquet {part.location}: no {want}; columns: {', '.join(names)}; "
                                f"name the label column with --label-field")
            kind = schema.field(column).type
            if not _label_type_ok(kind):
                raise UserError(f"parquet {part.location}: label column {column!r} has type {kind}; a label column "
                                f"holds integers, strings or lists of them")
            values = parquet.read(columns=[column]).column(0).to_pylist()  # only this column's chunks are read
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow/fsspec raise many types; all mean "cannot read the file"
        raise UserError(f"SRC parquet {part.location} cannot be read ({_first_line(err)}); repair or remove it") \
            from None
    class_names = _hf_class_names(schema, column)
    width = max(9, len(str(len(values))))  # zero-padded: id order is row order (the scan reads rows in id order)
    samples = [(f"{part.name}/{row:0{width}d}", value, part.location, row, PARQUET_ROW, part.mtime,
                class_names is not None)
               for row, value in enumerate(values)]
    return samples, class_names


def stream_parquet(src, label_field: str | None, label_map: Path | None):
    """(rows, Packed) as stream_webdataset, one file's label column at a time. Every file must name the same
    ClassLabel list (or none): the first file's is used, and a file naming another stops the listing."""
    _base, parts = list_files(src, ".parquet")
    if not parts:
        raise UserError(f"SRC {src} has no .parquet files")
    resolver = _LabelResolver(label_map)
    results = _iter_files(lambda p: _parquet_samples(p, label_field), parts, is_url(str(src)))
    first = next(results)
    names = first[1]
    names_from = "SRC" if names is None else "the parquet metadata (Hugging Face ClassLabel)"
    out = Packed(classes=[], class_source=names_from)
    early: list[tuple] = []

    def samples():
        for found, named in itertools.chain([first], results):
            if named != names:
                raise UserError(f"SRC {src}: the parquet files name different ClassLabel lists in their metadata; "
                                f"shard them separately or give a common --label-map")
            for sample in found:
                if sample[1] is None:
                    early.append((sample[0], None, "no_label", "label is null"))
                else:
                    yield sample

    return _resolved(samples(), resolver, names, names_from, out, early), out

