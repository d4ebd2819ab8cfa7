"""List the inputs of a shard job: ImageFolder trees, per-class tar archives, manifests (``manifests.py``).

Listing is cheap (directory walks, tar headers, manifest rows; no image bytes are read) and gives every
file a stable id, the id every later step keys on: its POSIX path relative to SRC, ``<class>.tar/<member>``
for archive members, the path as written in the manifest, or ``<ImageID>.jpg`` for OpenImages. Files that
can be judged without reading them (non-image extension, class not in ``--classes``, file outside any class
folder, a manifest path that does not exist) are rejected here.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

from .manifests import is_openimages_csv, list_manifest, list_openimages, stat as _stat

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
    size: int          # bytes; -1 when the file could not be stat'ed (rejected as missing_file or unreadable)
    mtime: int         # modification time (ns for files, s for archive members); part of the fingerprint
    labels: tuple[str, ...] = ()   # multi-label sources: every known label, class_name == labels[0]; else ()


@dataclass(frozen=True, slots=True)
class ListingReject:
    id: str
    class_name: str | None
    reason: str
    detail: str


@dataclass
class Listing:
    kind: str                      # folder | tars | manifest | openimages
    classes: list[str]
    inputs: list[InputFile]        # sorted by id; only files with an image extension and a known class
    rejects: list[ListingReject]   # judged without reading: name, class, label list, existence
    class_source: str              # "--classes FILE" or "SRC"
    fingerprint: str               # sha256 of the class list and every listed (id, class, size, mtime)
    multi_label: bool = False      # samples carry a label list (manifest `labels`, OpenImages)
    unknown_labels_dropped: int = 0  # labels not in --classes removed from images that kept a known one


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def detect_kind(src: Path, requested: str) -> str:
    if not src.exists():
        raise UserError(f"SRC {src} does not exist; give an ImageFolder tree, a folder of <class>.tar files, "
                        f"or a .csv/.jsonl manifest")
    if requested != "auto":
        kind = requested
    elif src.is_file():
        kind = "openimages" if is_openimages_csv(src) else "manifest"
    else:
        entries = list(os.scandir(src))
        has_tars = any(e.is_file() and e.name.endswith(".tar") for e in entries)
        has_dirs = any(e.is_dir() for e in entries)
        kind = "tars" if has_tars and not has_dirs else "folder"
    if kind == "manifest":
        if not src.is_file() or src.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"SRC {src}: a manifest must be a .csv or .jsonl file with 'path' and 'label'")
    elif kind == "openimages":
        if not src.is_file() or not is_openimages_csv(src):
            raise UserError(f"SRC {src}: an OpenImages annotation file must be a .csv whose header is "
                            f"ImageID,Source,LabelName,Confidence")
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


def _list_any(src: Path, kind: str, images: Path | None) -> tuple[list[str], list[tuple], bool]:
    """(classes found, rows, multi_label) of any kind of SRC; rows carry a class name, or a label tuple."""
    if images is not None and kind != "openimages":
        raise UserError(f"--images {images} is only for an OpenImages annotation file "
                        f"(ImageID,Source,LabelName,Confidence); SRC {src} is a {kind} source")
    if kind == "openimages":
        return list_openimages(src, images)
    if kind == "manifest":
        classes, rows, multi = list_manifest(src)
        if not multi:  # single-label manifest: the same rows (and fingerprint) as before multi-label sources
            rows = [(r[0], r[1][0], *r[2:]) for r in rows]
        return classes, rows, multi
    classes, rows = (_list_folder if kind == "folder" else _list_tars)(src)
    return classes, rows, False


def _judge(row: tuple, known: set[str], classes_file: Path | None, from_manifest: bool):
    """One listed row -> (InputFile, None, dropped labels) or (None, ListingReject, 0)."""
    file_id, label, path, offset, size, mtime = row
    multi = isinstance(label, tuple)
    first = (label[0] if label else None) if multi else label
    if label is None:
        return None, ListingReject(file_id, None, "no_class", "file is not inside a class folder"), 0
    if not is_image_name(file_id):
        return None, ListingReject(file_id, first, "non_image_file", "file name has no image extension"), 0
    if multi and not label:
        return None, ListingReject(file_id, None, "no_label", "no positive label (Confidence 1) for it"), 0
    kept = tuple(n for n in label if n in known) if multi else ((label,) if label in known else ())
    if not kept:
        names = f"labels {list(label)} are" if multi and len(label) > 1 else f"class {first!r} is"
        return None, ListingReject(file_id, first, "unknown_class", f"{names} not in {classes_file}"), 0
    if from_manifest and size < 0 and not os.path.exists(path):
        return None, ListingReject(file_id, kept[0], "missing_file", f"no such file {path}"), 0
    item = InputFile(file_id, kept[0], path, offset, size, mtime, kept if multi else ())
    return item, None, (len(label) - len(kept)) if multi else 0


def list_inputs(src: Path, kind: str, classes_file: Path | None, images: Path | None = None,
                label_field: str | None = None, label_map: Path | None = None) -> Listing:
    """All inputs of SRC, sorted by id, with the rejects that need no reading."""
    kind = detect_kind(src, kind)
    found_classes, rows, multi = _list_any(src, kind, images)
    classes = load_class_file(classes_file) if classes_file is not None else found_classes
    known = set(classes)
    inputs, rejects, dropped = [], [], 0
    digest = hashlib.sha256(json.dumps([kind, classes]).encode())
    for row in sorted(rows, key=lambda r: r[0]):
        file_id, label, _path, _offset, size, mtime = row
        digest.update(json.dumps([file_id, list(label) if multi else label, size, mtime]).encode())
        item, reject, lost = _judge(row, known, classes_file, kind in ("manifest", "openimages"))
        dropped += lost
        if item is not None:
            inputs.append(item)
        else:
            rejects.append(reject)
    if not inputs:
        raise UserError(f"SRC {src}: no image files found ({len(rejects)} other files); "
                        f"expected {'images in class folders' if kind == 'folder' else 'image entries'}")
    return Listing(kind=kind, classes=classes, inputs=inputs, rejects=rejects,
                   class_source=f"--classes {classes_file}" if classes_file else "SRC",
                   fingerprint=digest.hexdigest(), multi_label=multi, unknown_labels_dropped=dropped)
