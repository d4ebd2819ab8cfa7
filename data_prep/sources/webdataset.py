"""Webdataset tars as a source: tell them from per-class archives, and list their samples with their labels.

A webdataset sample is addressed like a per-class tar member: (tar, offset of the image member's data, its
size), read in place -- one ranged GET per image on object storage, never a local copy. Listing reads tar
headers plus the small label members (json/cls/txt). Samples are grouped by webdataset's rule (key = member
path up to the first dot of its base name; consecutive members with the same key form a sample); the image is
the sample's first member with an image extension.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from core.errors import UserError

from data_prep.limits import Limits, loads_label
from data_prep.sources.labels import LabelResolver, Packed, resolved
from data_prep.sources.remote import PackedFile, filesystem, first_line, is_url, iter_files, list_files, open_location

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff", "gif"})
_PEEK_MEMBERS = 32              # tar members looked at to tell webdataset shards from per-class archives
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members like __index__ are not samples
_INT = re.compile(r"-?[0-9]+")


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


def _info_classes(base: str, files: list[PackedFile]) -> tuple[list[str] | None, str]:
    """Class names of our own shards: the _info.json beside them, for the split whose shards are listed."""
    location = f"{base}/_info.json"
    try:
        fs, path = filesystem(location)
        info = json.loads(fs.cat_file(path))
    except (OSError, ValueError, RecursionError, UserError):
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
    """The parsed .json member, or None (absent, invalid, or nested too deep to parse safely)."""
    if "json" not in parts:
        return None
    value, _problem = loads_label(parts["json"], len(parts["json"]))  # its size was checked when it was read
    return value


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


def check_tar_end(handle, offset: int) -> None:
    """Raise tarfile.ReadError unless the block where tarfile stopped is the end-of-archive (zeros).

    Why: tarfile ends its iteration without an error at an unreadable header past the first (it takes it for
    the end), so a tar damaged in the middle would silently read as a shorter archive."""
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise tarfile.ReadError(f"unreadable header at byte {offset}")


def _judge_group(tar: PackedFile, key: str, members: list, field: str | None, seen: dict, ids: set):
    """One webdataset sample (consecutive members sharing a key) -> (sample, None) or (None, reject)."""
    parts = {ext.lower(): data for ext, _m, data in members if data is not None and data is not _TOO_BIG}
    seen.setdefault("members", set()).update(ext.lower() for ext, _m, _d in members)
    meta = _json(parts)
    if isinstance(meta, dict):
        seen.setdefault("json", set()).update(list(meta)[:50])
    image = next((m for ext, m, _d in members if _image_ext(ext)), None)
    sample_id = f"{tar.name}/{image.name if image is not None else key}"
    if image is None:
        exts = ", ".join(sorted({ext for ext, _m, _d in members}))[:200]
        return None, (sample_id, None, "no_image", f"sample {key!r} has no image member (members: {exts})")
    if sample_id in ids:
        return None, (sample_id, None, "duplicate_key", f"member {image.name!r} appears twice in {tar.name}")
    ids.add(sample_id)
    big = [ext for ext, _m, data in members if data is _TOO_BIG]
    if big:
        return None, (sample_id, None, "label_too_large", f"label member .{big[0]} is larger than --max-label-bytes")
    raw, why = _raw_label(parts, field)
    if raw is _MISSING:
        return None, (sample_id, None, "no_label", why)
    return (sample_id, raw, tar.location, image.offset_data, image.size, tar.mtime, False), None


_TOO_BIG = object()  # a label member over --max-label-bytes: not read


def _tar_samples(tar: PackedFile, field: str | None, seen: dict, limits: Limits) -> tuple[list[tuple], list[tuple]]:
    """(samples, rejects) of one webdataset tar; `seen` collects member extensions and json keys for messages.
    Each sample is judged when its last member has been read, so a tar's label members are never all held."""
    wanted = {"json", "cls", "txt", "labels"} | ({field} if field else set())
    samples, rejects, ids = [], [], set()
    key, members = None, []

    def finish():
        if members:
            sample, reject = _judge_group(tar, key, members, field, seen, ids)
            (samples if sample is not None else rejects).append(sample or reject)

    try:
        with open_location(tar.location) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                archive.members = []  # TarFile keeps every TarInfo it read unless told otherwise
                if not member.isfile() or _META.search(member.name):
                    continue
                name_key, ext = split_member(member.name)
                if name_key is None:
                    continue
                if name_key != key:  # webdataset groups consecutive members by key
                    finish()
                    key, members = name_key, []
                data = None
                if ext.lower() in wanted:
                    data = _TOO_BIG if member.size > limits.max_label_bytes else \
                        archive.extractfile(member).read()  # in memory; nothing is written to disk
                members.append((ext, member, data))
            finish()
            check_tar_end(handle, archive.offset)
    except (tarfile.TarError, EOFError) as err:  # damaged bytes: the samples before the damage are kept
        rejects.append((tar.name, None, "damaged_file", f"cannot be read as an uncompressed tar past its first "
                                                       f"{len(samples) + len(rejects)} samples ({first_line(err)}); "
                                                       f"the rest is lost: repair or remove it"))
    except OSError as err:  # the storage, not the bytes: stop (a re-run lists it again)
        raise UserError(f"SRC archive {tar.location} cannot be read ({first_line(err)}); check it and re-run") \
            from None
    return samples, rejects


def stream_webdataset(src, label_field: str | None, label_map: Path | None, limits: Limits = Limits()):
    """(rows, Packed): rows as each tar's headers and label members are read; the Packed's classes, rejects
    and multi_label are final once the rows are exhausted."""
    base, tars = list_files(src, ".tar")
    if not tars:
        raise UserError(f"SRC {src} has no .tar files")
    resolver = LabelResolver(label_map)
    names, names_from = _info_classes(base, tars)
    out = Packed(classes=[], class_source=names_from or "SRC")
    seen: dict = {}
    early: list[tuple] = []

    def samples():
        count = 0
        for found, rejects in iter_files(lambda t: _tar_samples(t, label_field, seen, limits), tars, is_url(str(src))):
            early.extend(rejects)
            count += len(found)
            yield from found
        if not count and any(r[2] == "no_label" for r in early):
            members = ", ".join(sorted(seen.get("members", ()))) or "none"
            keys = ", ".join(sorted(seen.get("json", ()))) or "none"
            what = f"--label-field {label_field}" if label_field else "a .cls member or data_prep's .json"
            raise UserError(f"SRC {src}: no sample has a label ({what}); members seen: {members}; json keys seen: "
                            f"{keys}; name the label with --label-field KEY")

    return resolved(samples(), resolver, names, out.class_source, out, early), out
