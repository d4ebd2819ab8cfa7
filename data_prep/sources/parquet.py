"""Parquet files of image bytes as a source: list the label column, read one row's image.

A parquet image is not byte-addressable (values sit inside compressed pages), so its address is (parquet
file, row index, ``images.PARQUET_ROW``); ``read_parquet_image`` reads the image column of that row's row
group once and keeps it (see ``_RowGroupCache`` for why that is the unit). Listing reads only the label column.
"""
from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from pathlib import Path

from core.errors import UserError

from data_prep.images import MAX_ROW_GROUP_BYTES, PARQUET_ROW, ImageRejected
from data_prep.limits import Limits
from data_prep.sources.labels import LabelResolver, Packed, resolved
from data_prep.sources.remote import PackedFile, first_line, is_url, iter_files, list_files, open_location

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")  # img2dataset: jpg/png/webp; Hugging Face: image
LABEL_COLUMNS = ("label", "labels", "cls")                       # parquet default label columns, in this order


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

    def image(self, location: str, row: int, max_group_bytes: int = MAX_ROW_GROUP_BYTES) -> bytes | None:
        parquet, _handle, (name, inner), starts = self._file(location)
        if not 0 <= row < starts[-1]:
            raise ImageRejected("unreadable", f"row {row} is past the file's {starts[-1]} rows")
        group = next(i for i in range(len(starts) - 1) if starts[i] <= row < starts[i + 1])
        key = (location, group)
        if key not in self.groups:
            size = _column_bytes(parquet.metadata.row_group(group), name)
            if size > max_group_bytes:  # from the footer, before anything is decompressed
                raise ImageRejected("too_large", f"row group {group} holds {size:,} bytes of images uncompressed "
                                                 f"> --max-row-group-bytes {max_group_bytes:,}")
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


def _column_bytes(group, name: str) -> int:
    """Uncompressed bytes of column `name` (and its struct fields) in one row group's metadata."""
    total = 0
    for i in range(group.num_columns):
        column = group.column(i)
        if column.path_in_schema == name or column.path_in_schema.startswith(name + "."):
            total += column.total_uncompressed_size
    return total


def read_parquet_image(location: str, row: int, max_group_bytes: int = MAX_ROW_GROUP_BYTES) -> bytes:
    """The image bytes of one parquet row; raises ImageRejected for a row without bytes, in a row group above
    `max_group_bytes`, or in a damaged file."""
    try:
        data = _ROW_GROUPS.image(location, row, max_group_bytes)
    except (ImageRejected, FileNotFoundError, UserError):
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/... for a damaged file
        raise ImageRejected("unreadable", f"parquet row {row}: {first_line(err)}") from None
    if data is None:
        raise ImageRejected("unreadable", f"parquet row {row} holds no image bytes (a null, or only a path)")
    return data


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


def _parquet_samples(part: PackedFile, label_field: str | None) -> tuple[list[tuple], list[str] | None, tuple | None]:
    """(samples, ClassLabel names or None, None), or ([], None, reject) for a file that cannot be read (damaged
    footer or pages): one bad file among many is a reject, not the end of the job. A file of another layout
    (no image or label column) is a mistake of SRC: one line."""
    import pyarrow as pa
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
    except (pa.ArrowException, ValueError, EOFError) as err:  # the bytes of the file, not the storage
        return [], None, (part.name, None, "damaged_file", f"cannot be read ({first_line(err)}); its rows are lost: "
                                                             f"repair or remove it")
    except Exception as err:  # noqa: BLE001 - fsspec/the store: an I/O failure stops the listing (re-run)
        raise UserError(f"SRC parquet {part.location} cannot be read ({first_line(err)}); repair or remove it") \
            from None
    class_names = _hf_class_names(schema, column)
    width = max(9, len(str(len(values))))  # zero-padded: id order is row order (the scan reads rows in id order)
    samples = [(f"{part.name}/{row:0{width}d}", value, part.location, row, PARQUET_ROW, part.mtime,
                class_names is not None)
               for row, value in enumerate(values)]
    return samples, class_names, None


def stream_parquet(src, label_field: str | None, label_map: Path | None, limits: Limits = Limits()):
    """(rows, Packed) as stream_webdataset, one file's label column at a time. Every file must name the same
    ClassLabel list (or none): the first file's is used, and a file naming another stops the listing."""
    _base, parts = list_files(src, ".parquet")
    if not parts:
        raise UserError(f"SRC {src} has no .parquet files")
    resolver = LabelResolver(label_map)
    results = iter_files(lambda p: _parquet_samples(p, label_field), parts, is_url(str(src)))
    first = []  # up to the first readable file, whose ClassLabel list is the one every file must name
    for result in results:
        first.append(result)
        if result[2] is None:
            break
    names = first[-1][1]
    names_from = "SRC" if names is None else "the parquet metadata (Hugging Face ClassLabel)"
    out = Packed(classes=[], class_source=names_from)
    early: list[tuple] = []

    def samples():
        for found, named, damaged in itertools.chain(first, results):
            if damaged is not None:
                early.append(damaged)
                continue
            if named != names:
                raise UserError(f"SRC {src}: the parquet files name different ClassLabel lists in their metadata; "
                                f"shard them separately or give a common --label-map")
            for sample in found:
                if sample[1] is None:
                    early.append((sample[0], None, "no_label", "label is null"))
                else:
                    yield sample

    return resolved(samples(), resolver, names, names_from, out, early), out
