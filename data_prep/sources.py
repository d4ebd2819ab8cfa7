"""List the inputs of a shard job: ImageFolder trees, folders of per-class tar archives, CSV/JSONL manifests.

Listing is cheap (directory walks, tar headers, manifest rows; no image bytes are read) and gives every
file a stable id, the id every later step keys on: its POSIX path relative to SRC, ``<class>.tar/<member>``
for archive members, or the path as written in the manifest. Files that can be judged from their name
alone (non-image extension, class not in ``--classes``, file outside any class folder) are rejected here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS, plus .gif (Pillow reads it); compared lower-case, so .JPG and
# .Jpeg count too. Anything else (.DS_Store, .txt, .json) is a "non_image_file".
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True, slots=True)
class InputFile:
    """One candidate image: where its bytes live and what it is labelled."""

    id: str            # stable, unique within the job
    class_name: str
    path: str          # file on disk, or the tar archive holding it
    offset: int        # byte offset of the member's data inside the archive; -1 for a plain file
    size: int          # bytes; -1 when the file could not be stat'ed (rejected later as unreadable)
    mtime: int         # modification time (ns for files, s for archive members); part of the fingerprint


@dataclass(frozen=True, slots=True)
class ListingReject:
    id: str
    class_name: str | None
    reason: str
    detail: str


@dataclass
class Listing:
    kind: str                      # folder | tars | manifest
    classes: list[str]
    inputs: list[InputFile]        # sorted by id; only files with an image extension and a known class
    rejects: list[ListingReject]   # judged from the name alone
    class_source: str              # "--classes FILE" or "SRC"
    fingerprint: str               # sha256 of the class list and every listed (id, class, size, mtime)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def detect_kind(src: Path, requested: str) -> str:
    if not src.exists():
        raise UserError(f"SRC {src} does not exist; give an ImageFolder tree, a folder of <class>.tar files, "
                        f"or a .csv/.jsonl manifest")
    if requested != "auto":
        kind = requested
    elif src.is_file():
        kind = "manifest"
    else:
        entries = list(os.scandir(src))
        has_tars = any(e.is_file() and e.name.endswith(".tar") for e in entries)
        has_dirs = any(e.is_dir() for e in entries)
        kind = "tars" if has_tars and not has_dirs else "folder"
    if kind == "manifest":
        if not src.is_file() or src.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"SRC {src}: a manifest must be a .csv or .jsonl file with 'path' and 'label'")
    elif not src.is_dir():
        raise UserError(f"SRC {src} is a file; --source {kind} needs a folder")
    return kind


def load_class_file(path: Path) -> list[str]:
    """Class order from a text file (one name per line, # comments) or JSON (a list or {"classes": [...]})."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"--classes {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"--classes {path}: not UTF-8 text; give one class name per line") from None
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


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _walk_class_folder(src: Path, folder: Path) -> list[tuple[str, str]]:
    """(id, path) of every file below one class folder, in torchvision's order (sorted walk, links followed)."""
    out = []
    for root, _dirs, files in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(files):
            full = os.path.join(root, name)
            out.append((Path(full).relative_to(src).as_posix(), full))
    return out


def _list_folder(src: Path) -> tuple[list[str], list[tuple[str, str | None, str, int, int, int]]]:
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        raise UserError(f"SRC {src} has no class folders; expected SRC/<class>/<image files>")
    rows = []
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if e.is_file():  # torchvision ignores these; we report them
            size, mtime = _stat(e.path)
            rows.append((e.name, None, e.path, -1, size, mtime))
    for name in classes:
        for file_id, full in _walk_class_folder(src, src / name):
            size, mtime = _stat(full)
            rows.append((file_id, name, full, -1, size, mtime))
    return classes, rows


def _list_tars(src: Path) -> tuple[list[str], list[tuple[str, str | None, str, int, int, int]]]:
    archives = sorted((e for e in os.scandir(src) if e.is_file() and e.name.endswith(".tar")), key=lambda e: e.name)
    if not archives:
        raise UserError(f"SRC {src} has no <class>.tar archives")
    classes = [e.name[: -len(".tar")] for e in archives]
    rows = []
    for entry, class_name in zip(archives, classes):
        try:
            # "r:" reads headers and seeks over the data: listing an archive costs one header read per member,
            # and nothing is ever extracted to disk.
            with tarfile.open(entry.path, mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        rows.append((f"{entry.name}/{member.name}", class_name, entry.path, member.offset_data,
                                     member.size, int(member.mtime)))
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"SRC archive {entry.path} cannot be read as an uncompressed tar ({err}); "
                            f"repair or remove it") from None
    return classes, rows


def _manifest_rows(path: Path):
    """(line number, row dict) of a CSV (header row) or JSONL manifest."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise UserError(f"manifest {path}: cannot read it ({err.strerror or err})") from None
    with handle:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(handle)
                if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                    raise UserError(f"manifest {path}: the header row must name the columns 'path' and 'label' "
                                    f"(found {reader.fieldnames})")
                for row in reader:
                    yield reader.line_num, row
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
                    yield lineno, row
        except UnicodeDecodeError:
            raise UserError(f"manifest {path}: not UTF-8 text") from None


def _label_text(value, path: Path, lineno: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)):
        raise UserError(f"manifest {path}:{lineno}: label {value!r} is not a class name or integer")
    text = str(value).strip()
    if not text:
        raise UserError(f"manifest {path}:{lineno}: empty label")
    return text


def _list_manifest(src: Path) -> tuple[list[str], list[tuple[str, str | None, str, int, int, int]]]:
    base = src.parent
    rows, first_line = [], {}
    for lineno, row in _manifest_rows(src):
        raw_path = row.get("path")
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise UserError(f"manifest {src}:{lineno}: missing or empty 'path'")
        if "label" not in row:
            raise UserError(f"manifest {src}:{lineno}: missing 'label'")
        label = _label_text(row["label"], src, lineno)
        file_id = Path(raw_path.strip()).as_posix()
        if file_id in first_line:
            raise UserError(f"manifest {src}:{lineno}: path {file_id!r} is already listed on line "
                            f"{first_line[file_id]}; list each file once")
        first_line[file_id] = lineno
        full = str(base / file_id)
        size, mtime = _stat(full)
        rows.append((file_id, label, full, -1, size, mtime))
    if not rows:
        raise UserError(f"manifest {src} has no rows")
    labels = {r[1] for r in rows}
    # Integer labels ("0".."999") are sorted as numbers so that class index == label; names sort as text.
    classes = sorted(labels, key=int) if all(lab.lstrip("-").isdigit() for lab in labels) else sorted(labels)
    return classes, rows


def list_inputs(src: Path, kind: str, classes_file: Path | None) -> Listing:
    """All inputs of SRC, sorted by id, with the rejects that need no reading."""
    kind = detect_kind(src, kind)
    lister = {"folder": _list_folder, "tars": _list_tars, "manifest": _list_manifest}[kind]
    found_classes, rows = lister(src)
    classes = load_class_file(classes_file) if classes_file is not None else found_classes
    known = set(classes)
    inputs, rejects = [], []
    digest = hashlib.sha256(json.dumps([kind, classes]).encode())
    for file_id, class_name, path, offset, size, mtime in sorted(rows, key=lambda r: r[0]):
        digest.update(json.dumps([file_id, class_name, size, mtime]).encode())
        if class_name is None:
            rejects.append(ListingReject(file_id, None, "no_class", "file is not inside a class folder"))
        elif not is_image_name(file_id):
            rejects.append(ListingReject(file_id, class_name, "non_image_file", "file name has no image extension"))
        elif class_name not in known:
            rejects.append(ListingReject(file_id, class_name, "unknown_class",
                                         f"class {class_name!r} is not in {classes_file}"))
        else:
            inputs.append(InputFile(file_id, class_name, path, offset, size, mtime))
    if not inputs:
        raise UserError(f"SRC {src}: no image files found ({len(rejects)} other files); "
                        f"expected {'images in class folders' if kind == 'folder' else 'image entries'}")
    return Listing(kind=kind, classes=classes, inputs=inputs, rejects=rejects,
                   class_source=f"--classes {classes_file}" if classes_file else "SRC",
                   fingerprint=digest.hexdigest())
