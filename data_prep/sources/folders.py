"""Walk ImageFolder trees (local, or under an object-store prefix) and per-class tar archives into listing
rows ``(id, class, location, offset, size, mtime)``, streamed: nothing here holds the whole listing."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from core.errors import UserError

from data_prep.sources.labels import Packed
from data_prep.sources.manifests import stat as _stat
from data_prep.sources.remote import is_url, list_files, open_location, walk_class_folders


def _walk_class_folder(src: Path, folder: Path) -> list[tuple[str, str]]:
    """(id, path) of every file below one class folder, in torchvision's order (sorted walk, links followed)."""
    out = []
    for root, _dirs, files in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(files):
            full = os.path.join(root, name)
            out.append((Path(full).relative_to(src).as_posix(), full))
    return out


def iter_folder_url(src: str, found: Packed):
    """Rows of an ImageFolder tree under an object-store prefix (<prefix>/<class>/.../<image>, read whole per
    image), one class folder at a time; found.classes (the folders holding files) is set once they are done."""
    classes = []
    for folder, files in walk_class_folders(src):
        if folder is not None and files:
            classes.append(folder)
        for f in files:
            yield (f.name, folder, f.location, -1, f.size, f.mtime)
    if not classes:
        raise UserError(f"SRC {src} has no class folders; expected SRC/<class>/<image files>")
    found.classes = classes


def iter_folder(src: Path, classes: list[str]):
    """Rows of a local ImageFolder tree, streamed (files directly in SRC first, then class by class)."""
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if e.is_file():  # torchvision ignores these; we report them
            size, mtime = _stat(e.path)
            yield (e.name, None, e.path, -1, size, mtime)
    for name in classes:
        for file_id, full in _walk_class_folder(src, src / name):
            size, mtime = _stat(full)
            yield (file_id, name, full, -1, size, mtime)


def folder_classes(src: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        raise UserError(f"SRC {src} has no class folders; expected SRC/<class>/<image files>")
    return classes


def tar_archives(src) -> tuple[list[str], list[tuple[str, str]]]:
    """Classes and (file name, location) of SRC's <class>.tar archives, local or under an object-store prefix."""
    if is_url(src):  # object storage: the same walk over ranged GETs (packed.open_location)
        archives = [(f.name, f.location) for f in list_files(src, ".tar")[1]]
    else:
        archives = sorted(((e.name, e.path) for e in os.scandir(src) if e.is_file() and e.name.endswith(".tar")))
    if not archives:
        raise UserError(f"SRC {src} has no <class>.tar archives")
    return [name[: -len(".tar")] for name, _location in archives], archives


def iter_tars(archives: list[tuple[str, str]], classes: list[str]):
    """Rows of every member of the archives, streamed archive by archive (ImageNet-21K: 14M members)."""
    for (name, location), class_name in zip(archives, classes):
        try:
            # "r:" reads headers and seeks over the data: listing an archive costs one header read per member,
            # and nothing is ever extracted to disk. The members are yielded as read, not kept (TarFile keeps
            # every TarInfo it has read unless told otherwise: `archive.members` is cleared per member).
            with open_location(location) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        yield (f"{name}/{member.name}", class_name, location, member.offset_data, member.size,
                               int(member.mtime))
                    archive.members = []
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"SRC archive {location} cannot be read as an uncompressed tar ({err}); "
                            f"repair or remove it") from None
