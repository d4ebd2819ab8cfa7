"""List the inputs of a manifest: CSV/JSONL rows with one label or several, or OpenImages annotation files;
and read a label map (``--label-map``: raw labels of a packed source -> class names).

Each lister returns ``(classes, rows, multi_label)``; a row is ``(id, labels, path, offset, size, mtime)``
with ``labels`` a tuple of class names in source order, duplicates removed. ``multi_label`` is a property
of the *source*, not of its rows: a manifest that uses ``labels`` anywhere (or any OpenImages file) makes a
multi-label split even where a row has one label, so one split never mixes two sample layouts. A
single-label manifest keeps today's layout, and so today's bytes.

Mistakes in a row (no path, no or empty label list) stop the job with ``file:line``: guessing would
silently change the class list. Judging the images themselves (missing files, unknown classes) is left to
``sources.list_inputs``, which reports them per image.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from core.errors import UserError

OPENIMAGES_HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
LABEL_SEPARATOR = "|"   # CSV `labels` cell: "cat|dog|person"

Row = tuple  # (id, labels: tuple[str, ...], path, offset, size, mtime)


def stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, -1) when the file cannot be stat'ed (missing: rejected when listed)."""
    try:
        st = os.stat(path)
    except OSError:
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


def _manifest_rows(path: Path):
    """(line number, row dict, multi-label header?) of a CSV (header row) or JSONL manifest."""
    with _open_text(path, "manifest") as handle:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(handle)
                fields = set(reader.fieldnames or [])
                if "path" not in fields or not fields & {"label", "labels"}:
                    raise UserError(f"manifest {path}: the header row must name the columns 'path' and 'label' "
                                    f"(one class) or 'labels' (several, separated by '{LABEL_SEPARATOR}') "
                                    f"(found {reader.fieldnames})")
                if {"label", "labels"} <= fields:
                    raise UserError(f"manifest {path}: the header names both 'label' and 'labels'; keep one")
                for row in reader:
                    yield reader.line_num, row, "labels" in fields
            else:
                for lineno, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"manifest {path}:{lineno}: invalid JSON ({err.msg}); "
                                        f"expected {{\"path\": ..., \"label\": ...}}") from None
                    if not isinstance(row, dict):
                        raise UserError(f"manifest {path}:{lineno}: expected a JSON object with 'path' and 'label'")
                    yield lineno, row, "labels" in row
        except UnicodeDecodeError:
            raise UserError(f"manifest {path}: not UTF-8 text") from None


def _label_text(value, where: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)):
        raise UserError(f"manifest {where}: label {value!r} is not a class name or integer")
    text = str(value).strip()
    if not text:
        raise UserError(f"manifest {where}: empty label")
    return text


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))  # source order, duplicates removed


def _row_labels(row: dict, where: str, is_csv: bool) -> tuple[str, ...]:
    """The label names of one manifest row: `label` (one) or `labels` (a JSON list, or 'a|b' in CSV)."""
    if "label" in row and "labels" in row:
        raise UserError(f"manifest {where}: give 'label' or 'labels', not both")
    if "labels" not in row:
        if "label" not in row:
            raise UserError(f"manifest {where}: missing 'label' (or 'labels')")
        return (_label_text(row["label"], where),)
    value = row["labels"]
    if is_csv:
        value = [] if value is None or not value.strip() else value.split(LABEL_SEPARATOR)
    elif not isinstance(value, list):
        raise UserError(f"manifest {where}: 'labels' must be a JSON list of class names, got {value!r}")
    if not value:
        raise UserError(f"manifest {where}: empty label list; give at least one label, or leave the image out")
    return _unique(_label_text(v, where) for v in value)


def iter_manifest(src: Path, seen: dict):
    """Stream the rows of a CSV/JSONL manifest as ``(row, line number)``; paths are relative to the manifest's
    folder. Keeps nothing per row: ``seen`` gets the label names (``"names"``), whether any row used
    ``labels`` (``"multi"``) and the row count. A path listed twice is found later, per partition
    (``sources.list_partitioned``), or by ``list_manifest``."""
    base = src.parent
    is_csv = src.suffix.lower() == ".csv"
    names, multi, count = seen.setdefault("names", set()), False, 0
    for lineno, row, multi_row in _manifest_rows(src):
        where = f"{src}:{lineno}"
        raw_path = row.get("path")
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise UserError(f"manifest {where}: missing or empty 'path'")
        labels = _row_labels(row, where, is_csv)
        names.update(labels)
        multi = multi or multi_row
        seen["multi"] = multi
        count += 1
        file_id = Path(raw_path.strip()).as_posix()
        full = str(base / file_id)
        yield (file_id, labels, full, -1, *stat(full)), lineno
    if not count:
        raise UserError(f"manifest {src} has no rows")


def duplicate_path(src: Path, file_id: str, first: int, again: int) -> UserError:
    return UserError(f"manifest {src}:{again}: path {file_id!r} is already listed on line {first}; list each "
                     f"file once")


def list_manifest(src: Path) -> tuple[list[str], list[Row], bool]:
    """Rows of a CSV/JSONL manifest, all in memory (``sources.list_inputs``)."""
    seen: dict = {}
    rows, first_line = [], {}
    for row, lineno in iter_manifest(src, seen):
        if row[0] in first_line:
            raise duplicate_path(src, row[0], first_line[row[0]], lineno)
        first_line[row[0]] = lineno
        rows.append(row)
    return sorted_classes(seen["names"]), rows, bool(seen.get("multi"))


def _confidence(text: str, where: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UserError(f"annotations {where}: Confidence {text!r} is not a number") from None


def list_openimages(src: Path, images: Path | None) -> tuple[list[str], list[Row], bool]:
    """OpenImages image-level labels: one row per (image, label); only Confidence 1 is a positive label.

    Images whose rows are all Confidence 0 get an empty label tuple (rejected as 'no_label' when listed).
    """
    if images is None:
        raise UserError(f"SRC {src} is an OpenImages annotation file; give the image folder with --images DIR "
                        f"(it holds <ImageID>.jpg)")
    if not images.is_dir():
        raise UserError(f"--images {images}: not a folder; give the folder that holds <ImageID>.jpg")
    labels: dict[str, list[str]] = {}
    with _open_text(src, "annotations") as handle:
        reader = csv.reader(handle)
        try:
            next(reader, None)  # the header, checked by is_openimages_csv
            for row in reader:
                where = f"{src}:{reader.line_num}"
                if not row:
                    continue
                if len(row) != len(OPENIMAGES_HEADER):
                    raise UserError(f"annotations {where}: expected 4 fields ImageID,Source,LabelName,Confidence")
                image_id, _source, label, confidence = (field.strip() for field in row)
                if not image_id or "/" in image_id or image_id.startswith("."):
                    raise UserError(f"annotations {where}: ImageID {image_id!r} is not a file name")
                if not label:
                    raise UserError(f"annotations {where}: empty LabelName")
                names = labels.setdefault(image_id, [])
                if _confidence(confidence, where) == 1:
                    names.append(label)
        except UnicodeDecodeError:
            raise UserError(f"annotations {src}: not UTF-8 text") from None
    if not labels:
        raise UserError(f"annotations {src} has no rows")
    rows = []
    for image_id, names in labels.items():
        full = str(images / f"{image_id}.jpg")
        rows.append((f"{image_id}.jpg", _unique(names), full, -1, *stat(full)))
    return sorted_classes(n for r in rows for n in r[1]), rows, True


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
