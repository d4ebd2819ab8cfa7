"""List the inputs of a manifest: CSV/JSONL rows with one label or several, or OpenImages annotation files;
and read a label map (``--label-map``: raw labels of a packed source -> class names) and a ``--classes`` file.

Each lister returns ``(classes, rows, multi_label)``; a row is ``(id, labels, path, offset, size, mtime)``
with ``labels`` a tuple of class names in source order, duplicates removed. ``multi_label`` is a property
of the *source*, not of its rows: a manifest that uses ``labels`` anywhere (or any OpenImages file) makes a
multi-label split even where a row has one label, so one split never mixes two sample layouts. A
single-label manifest keeps today's layout, and so today's bytes.

Mistakes in a row (no path, no or empty label list, a bad label type, a line too long, undecodable or
NUL bytes in the path) make that row a reject naming ``file:line``, and the job goes on; a header without
the needed columns stops it. Judging the images themselves (missing files, unknown classes) is left to
``sources.list_inputs``, which reports them per image.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from core.errors import UserError

from data_prep.limits import Limits, Rejected, bad_name, loads_label, rejected
from data_prep.sources.manifest_ranges import EndMark, ManifestRange, open_range

OPENIMAGES_HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
LABEL_SEPARATOR = "|"   # CSV `labels` cell: "cat|dog|person"

Row = tuple  # (id, labels: tuple[str, ...], path, offset, size, mtime)


def stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, -1) when the file cannot be stat'ed (missing: rejected when listed)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path (rejected as bad_name when listed)
        return -1, -1
    return st.st_size, st.st_mtime_ns


def sorted_classes(names) -> list[str]:
    """Integer labels ("0".."999") sort as numbers, so class index == label; names sort as text."""
    names = set(names)
    return sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else sorted(names)


def _open_text(path: Path, what: str):
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise UserError(f"{what} {path}: cannot read it ({err.strerror or err})") from None


def is_openimages_csv(path: Path) -> bool:
    """A .csv whose header row is exactly ``ImageID,Source,LabelName,Confidence`` (OpenImages labels)."""
    if path.suffix.lower() != ".csv":
        return False
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return [h.strip() for h in header or []] == OPENIMAGES_HEADER


def _jsonl_rows(path: Path, handle, max_row: int, seen: dict):
    """(line number, row dict or Rejected) of a JSONL manifest; a line longer than max_row is skipped unread
    (a reject), so one hostile line cannot fill the memory. ``seen["lines"]``: the lines read."""
    lineno = 0
    while True:
        line = handle.readline(max_row + 1)
        if not line:
            seen["lines"] = lineno
            return
        lineno += 1
        where = f"{path.name}:{lineno}"
        if len(line) > max_row and not line.endswith("\n"):
            while line and not line.endswith("\n"):  # the rest of the line, in bounded pieces
                line = handle.readline(max_row + 1)
            yield lineno, rejected(where, "label_too_large", f"{where}: line longer than {max_row:,} characters")
            continue
        if not line.strip():
            continue
        value, problem = loads_label(line, max_row)
        if problem is None and not isinstance(value, dict):
            problem = ("bad_row", "expected a JSON object with 'path' and 'label'")
        yield lineno, (value if problem is None else rejected(where, problem[0], f"{where}: {problem[1]}"))


def _open_manifest(path: Path, span: ManifestRange | None):
    try:
        if span is not None:
            return open_range(path, span)
        return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as err:
        raise UserError(f"manifest {path}: cannot read it ({err.strerror or err})") from None


def _header(path: Path, reader: csv.DictReader) -> list[str]:
    """A CSV manifest's columns, or one line saying what the header lacks."""
    try:
        fields = list(reader.fieldnames or [])
    except csv.Error as err:
        raise UserError(f"manifest {path}: unreadable header row ({err})") from None
    if "path" not in fields or not set(fields) & {"label", "labels"}:
        raise UserError(f"manifest {path}: the header row must name the columns 'path' and 'label' "
                        f"(one class) or 'labels' (several, separated by '{LABEL_SEPARATOR}') "
                        f"(found {reader.fieldnames})")
    if {"label", "labels"} <= set(fields):
        raise UserError(f"manifest {path}: the header names both 'label' and 'labels'; keep one")
    return fields


def csv_header(path: Path, limits: Limits) -> list[str]:
    """The checked header of a CSV manifest: what the ranges after the first one are read with."""
    csv.field_size_limit(limits.max_label_bytes + 4096)
    with _open_manifest(path, None) as handle:
        return _header(path, csv.DictReader(handle))


def _manifest_rows(path: Path, limits: Limits, seen: dict, span: ManifestRange | None = None,
                   header: list[str] | None = None):
    """(line number, row dict or Rejected, multi-label header?) of a CSV (header row) or JSONL manifest, or of
    one range of it (``span``; a CSV's ``header`` read by ``csv_header``). ``seen["lines"]``: the lines read;
    ``seen["cut"]``: a quoted CSV field runs past the range's end.

    Undecodable bytes are kept as surrogates (the row's path is then a bad_name reject), so one bad row
    does not end the job; a header without 'path' and 'label' does."""
    max_row = limits.max_label_bytes + 4096  # a path and a label of the largest size allowed
    with _open_manifest(path, span) as handle:
        if path.suffix.lower() != ".csv":
            for lineno, row in _jsonl_rows(path, handle, max_row, seen):
                yield lineno, row, isinstance(row, dict) and "labels" in row
            return
        csv.field_size_limit(max_row)
        lines = EndMark(handle) if span is not None and span.end < span.size else handle
        if span is None or span.start == 0:
            reader = csv.DictReader(lines)
            fields = _header(path, reader)
        else:
            reader, fields = csv.DictReader(lines, fieldnames=header), header
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # a field over the size limit, a NUL: this row only
                if getattr(lines, "reached", False):
                    seen["cut"] = True
                    break
                where = f"{path.name}:{reader.line_num}"
                yield reader.line_num, rejected(where, "bad_row", f"{where}: {err}"), False
                continue
            if getattr(lines, "reached", False):  # the mark: a row of its own, or swallowed by a quoted field
                seen["cut"] = not lines.is_mark(row, fields)
                break
            yield reader.line_num, row, "labels" in fields
        seen["lines"] = reader.line_num - getattr(lines, "reached", False)


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _label_text(value, limits: Limits) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)):
        raise _BadRow("bad_label", f"label {str(value)[:80]!r} is not a class name or integer")
    text = str(value).strip()
    if not text:
        raise _BadRow("bad_label", "empty label")
    if len(text) > limits.max_label_bytes:
        raise _BadRow("label_too_large", f"label of {len(text):,} characters > --max-label-bytes")
    return text


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))  # source order, duplicates removed


def _row_labels(row: dict, is_csv: bool, limits: Limits) -> tuple[str, ...]:
    """The label names of one manifest row: `label` (one) or `labels` (a JSON list, or 'a|b' in CSV)."""
    if "label" in row and "labels" in row and not is_csv:
        raise _BadRow("bad_label", "give 'label' or 'labels', not both")
    if "labels" not in row:
        if "label" not in row:
            raise _BadRow("bad_label", "missing 'label' (or 'labels')")
        return (_label_text(row["label"], limits),)
    value = row["labels"]
    if is_csv:
        value = [] if value is None or not value.strip() else value.split(LABEL_SEPARATOR)
    elif not isinstance(value, list):
        raise _BadRow("bad_label", f"'labels' must be a JSON list of class names, got {str(value)[:80]!r}")
    if not value:
        raise _BadRow("bad_label", "empty label list; give at least one label, or leave the image out")
    if len(value) > limits.max_labels:
        raise _BadRow("too_many_labels", f"{len(value):,} labels > --max-labels {limits.max_labels:,}")
    return _unique(_label_text(v, limits) for v in value)


def _row(base: Path, row: dict, is_csv: bool, limits: Limits):
    """(file_id, labels, full path) of a parsed row; raises _BadRow."""
    raw_path = row.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise _BadRow("bad_row", "missing or empty 'path'")
    labels = _row_labels(row, is_csv, limits)
    file_id = Path(raw_path.strip()).as_posix()
    why = bad_name(file_id)
    if why is not None:
        raise _BadRow("bad_name", why)
    return file_id, labels, str(base / file_id)


def iter_manifest(src: Path, seen: dict, limits: Limits = Limits(), span: ManifestRange | None = None,
                  header: list[str] | None = None):
    """Stream the rows of a CSV/JSONL manifest (or of one range of it: ``span``, see ``_manifest_rows``) as
    ``(row, line number)``; paths are relative to the manifest's folder. A bad row is a ``limits.Rejected``
    (its id ``<manifest>:<line>``, or its path when it has one; ``seen["line_ids"]`` gets the line numbers of
    the first kind). Keeps nothing per row: ``seen`` gets the label names (``"names"``), whether any row used
    ``labels`` (``"multi"``) and the row count (``"rows"``). A path listed twice is found later, per partition
    (``sources.list_partitioned``), or by ``list_manifest``."""
    base = src.parent
    is_csv = src.suffix.lower() == ".csv"
    names, multi, count = seen.setdefault("names", set()), False, 0
    line_ids = seen.setdefault("line_ids", set())
    for lineno, row, multi_row in _manifest_rows(src, limits, seen, span, header):
        count += 1
        seen["rows"] = count
        if isinstance(row, Rejected):
            if span is not None:
                line_ids.add(lineno)
            yield row, lineno
            continue
        try:
            file_id, labels, full = _row(base, row, is_csv, limits)
        except _BadRow as bad:
            raw = row.get("path")
            by_path = isinstance(raw, str) and raw.strip() and bad.reason != "bad_name"
            name = raw.strip() if by_path else f"{src.name}:{lineno}"
            if not by_path and span is not None:
                line_ids.add(lineno)
            yield rejected(name, bad.reason, f"{src.name}:{lineno}: {bad.detail}"), lineno
            continue
        names.update(labels)
        multi = multi or multi_row
        seen["multi"] = multi
        yield (file_id, labels, full, -1, *stat(full)), lineno
    if not count and span is None:  # in parts: the driver checks the sum (``shard.listing_parts``)
        raise UserError(f"manifest {src} has no rows")


def duplicate_path(src: Path, file_id: str, first: int, again: int) -> UserError:
    return UserError(f"manifest {src}:{again}: path {file_id!r} is already listed on line {first}; list each "
                     f"file once")


def list_manifest(src: Path) -> tuple[list[str], list[Row], bool]:
    """Rows of a CSV/JSONL manifest, all in memory (``sources.list_inputs``)."""
    seen: dict = {}
    rows, first_line = [], {}
    for row, lineno in iter_manifest(src, seen):
        if isinstance(row, Rejected):
            continue  # list_inputs (small, in-memory listings) has no reject channel for them; list_partitioned has
        if row[0] in first_line:
            raise duplicate_path(src, row[0], first_line[row[0]], lineno)
        first_line[row[0]] = lineno
        rows.append(row)
    return sorted_classes(seen["names"]), rows, bool(seen.get("multi"))


def list_openimages(src: Path, images: Path | None, limits: Limits = Limits()) -> tuple[list[str], list[Row], bool]:
    """OpenImages image-level labels: one row per (image, label); only Confidence 1 is a positive label.

    Images whose rows are all Confidence 0 get an empty label tuple (rejected as 'no_label' when listed). A bad
    row is a ``Rejected`` after the rows (its id ``<file>:<line>``).
    """
    if images is None:
        raise UserError(f"SRC {src} is an OpenImages annotation file; give the image folder with --images DIR "
                        f"(it holds <ImageID>.jpg)")
    if not images.is_dir():
        raise UserError(f"--images {images}: not a folder; give the folder that holds <ImageID>.jpg")
    labels: dict[str, list[str]] = {}
    bad: list[Rejected] = []
    for where, row in _openimages_rows(src):
        if isinstance(row, Rejected):
            bad.append(row)
            continue
        image_id, _source, label, confidence = (field.strip() for field in row)
        problem = None
        if not image_id or "/" in image_id or image_id.startswith(".") or bad_name(image_id):
            problem = f"ImageID {image_id[:80]!r} is not a file name"
        elif not label or len(label) > limits.max_label_bytes:
            problem = "empty LabelName" if not label else "LabelName longer than --max-label-bytes"
        else:
            try:
                positive = float(confidence) == 1
            except ValueError:
                problem = f"Confidence {confidence[:40]!r} is not a number"
        if problem is not None:
            bad.append(rejected(where, "bad_row", f"{where}: {problem}"))
            continue
        names = labels.setdefault(image_id, [])
        if positive:
            names.append(label)
    if not labels and not bad:
        raise UserError(f"annotations {src} has no rows")
    rows = []
    for image_id, names in labels.items():
        full = str(images / f"{image_id}.jpg")
        rows.append((f"{image_id}.jpg", _unique(names), full, -1, *stat(full)))
    return sorted_classes(n for r in rows for n in r[1]), rows + bad, True


def _openimages_rows(src: Path):
    """(file:line, the 4 fields or a Rejected) of an OpenImages annotation file after its header."""
    try:
        handle = open(src, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as err:
        raise UserError(f"annotations {src}: cannot read it ({err.strerror or err})") from None
    with handle:
        reader = csv.reader(handle)
        next(reader, None)  # the header, checked by is_openimages_csv
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                where = f"{src.name}:{reader.line_num}"
                yield where, rejected(where, "bad_row", f"{where}: {err}")
                continue
            where = f"{src.name}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(OPENIMAGES_HEADER):
                yield where, rejected(where, "bad_row", f"{where}: expected 4 fields ImageID,Source,LabelName,"
                                                        f"Confidence")
                continue
            yield where, row


def load_label_map(path: Path) -> dict[str, str]:
    """``--label-map FILE``: a JSON object {raw label: class name} or a CSV of ``raw,class`` rows (no header).

    Raw labels are compared as text (the integer 3 and the string "3" are the same raw label). Several raw
    labels may map to one class (merging classes); a raw label mapped twice is an error, not a silent pick.
    A CSV header row such as ``label,name`` is harmless: it maps the raw label "label", which no sample has.
    """
    where = f"--label-map {path}"
    mapping: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        with _open_text(path, "--label-map") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: invalid JSON at line {err.lineno} ({err.msg})") from None
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object {{\"raw label\": \"class name\", ...}}")
        for raw, name in data.items():
            if isinstance(name, bool) or not isinstance(name, (str, int)) or not str(name).strip():
                raise UserError(f"{where}: raw label {raw!r} maps to {name!r}; give a class name")
            mapping[raw.strip()] = str(name).strip()
    else:
        with _open_text(path, "--label-map") as handle:
            reader = csv.reader(handle)
            try:
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    cells = [cell.strip() for cell in row]
                    if len(cells) != 2 or not all(cells):
                        raise UserError(f"{where}:{reader.line_num}: expected two columns raw_label,class_name "
                                        f"(got {row!r})")
                    if cells[0] in mapping and mapping[cells[0]] != cells[1]:
                        raise UserError(f"{where}:{reader.line_num}: raw label {cells[0]!r} is mapped twice "
                                        f"({mapping[cells[0]]!r} and {cells[1]!r})")
                    mapping[cells[0]] = cells[1]
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            except csv.Error as err:
                raise UserError(f"{where}:{reader.line_num}: {err}") from None
    if not mapping:
        raise UserError(f"{where}: maps no labels")
    return mapping


def read_classes_text(path: Path, encoding: str = "utf-8-sig") -> str:
    """The text of a --classes file, or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding=encoding)
    except OSError as err:
        raise UserError(f"--classes {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"--classes {path}: not UTF-8 text; give one class name per line") from None


def load_class_file(path: Path) -> list[str]:
    """Class order from a text file (one name per line, # comments) or JSON (a list or {"classes": [...]})."""
    text = read_classes_text(path, encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--classes {path}: invalid JSON at line {err.lineno} ({err.msg})") from None
        if isinstance(data, dict):
            data = data.get("classes")
        if not isinstance(data, list) or not all(isinstance(c, str) and c for c in data):
            raise UserError(f"--classes {path}: expected a JSON list of class names or {{\"classes\": [...]}}")
        classes = list(data)
    else:
        classes = [line.strip() for line in text.splitlines()]
        classes = [c for c in classes if c and not c.startswith("#")]
    if not classes:
        raise UserError(f"--classes {path}: no class names in it")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if name in seen:
            raise UserError(f"--classes {path}: class {name!r} is listed twice (entries {seen[name] + 1} and {i + 1})")
        seen[name] = i
    return classes
