"""Walk ImageFolder trees (local, or under an object-store prefix) and per-class tar archives into listing
rows ``(id, class, location, offset, size, mtime)``, streamed: nothing here holds the whole listing."""
from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

from core.errors import UserError

from data_prep.sources.labels import Packed
from data_prep.limits import rejected
from data_prep.sources.remote import is_url, list_files, open_location, walk_class_folders
from data_prep.sources.webdataset import check_tar_end


_DIR = object()  # _entry's mark of a folder to walk into


def _entry(src: Path, full: str, class_name: str | None, visited: set):
    """One directory entry -> a row, a Rejected, or (_DIR, full) for a folder to walk into.

    Links are followed (torchvision does), but a folder whose (device, inode) was walked already is a reject,
    so a link loop (``class/loop -> ..``) or a second link to one folder never lists an image twice. Only
    regular files become rows: a FIFO, a device (``x.jpg -> /dev/zero``) or a socket is never opened."""
    rel = Path(full).relative_to(src).as_posix()
    try:
        info = os.stat(full)
    except (OSError, ValueError):  # a dangling link, a file that went away: its read is rejected
        return (rel, class_name, full, -1, -1, -1)
    if stat.S_ISDIR(info.st_mode):
        if (info.st_dev, info.st_ino) in visited:
            return rejected(rel, "repeated_folder", "a link to a folder already listed (a loop or a second link); "
                                                    "not followed", class_name)
        visited.add((info.st_dev, info.st_ino))
        return (_DIR, full)
    if not stat.S_ISREG(info.st_mode):
        return rejected(rel, "not_a_file", "not a regular file (a FIFO, device or socket); not read", class_name)
    return (rel, class_name, full, -1, info.st_size, info.st_mtime_ns)


def _walk_class_folder(src: Path, folder: Path, class_name: str, visited: set):
    """Rows (and Rejected) of everything below one class folder: a sorted depth-first walk, links followed,
    each folder entered once (``_entry``)."""
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        try:
            names = sorted(e.name for e in os.scandir(current))
        except OSError as err:
            yield rejected(Path(current).relative_to(src).as_posix(), "unreadable",
                           f"cannot list this folder ({err.strerror or err})", class_name)
            continue
        folders = []
        for name in names:
            item = _entry(src, os.path.join(current, name), class_name, visited)
            if item[0] is _DIR:
                folders.append(item[1])
            else:
                yield item
        stack.extend(reversed(folders))


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
    root = os.stat(src)
    visited = {(root.st_dev, root.st_ino)}
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if not e.is_dir():  # torchvision ignores these; we report them
            item = _entry(src, e.path, None, set())
            if item[0] is not _DIR:
                yield item
    for name in classes:
        item = _entry(src, str(src / name), name, visited)
        if item[0] is not _DIR:
            yield item
            continue
        yield from _walk_class_folder(src, src / name, name, visited)


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
                check_tar_end(handle, archive.offset)
        except (tarfile.TarError, EOFError) as err:  # damaged bytes: the members before the damage are kept
            yield rejected(name, "damaged_file", f"cannot be read as an uncompressed tar past this point ({err}); "
                                                 f"the rest of the archive is lost: repair or remove it", class_name)
        except OSError as err:  # the storage, not the bytes: stop (a re-run lists it again)
            raise UserError(f"SRC archive {location} cannot be read ({err}); check it and re-run") from None
