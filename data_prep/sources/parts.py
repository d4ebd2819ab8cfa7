"""The listing split into parts -- one per-class tar, webdataset tar or parquet file each, or one byte range of
a CSV/JSONL manifest (``manifest_ranges``) -- so that Ray tasks can list them in parallel and a killed job re-lists only the parts it had not finished (``shard.listing_parts``).

Why the result does not depend on the split: every row of a part becomes the same raw spill line as in the
one-process listing (``listing.raw_entry``: its order key in front), the driver appends every part's lines to
the same 256 raw spill files, and each of those is sorted by order key before it is judged. Ids are unique, so
the order is a function of the rows alone. What must stay global is kept global by the driver: the class list
(a part reports the class names it found), the lister's rejects in their one-process order (a part returns
them by stage: bad names, the lister's own, labels resolving to no class), and the checks over all files
(webdataset: no sample has a label; parquet: every file names the same ClassLabel list).

A manifest's range numbers its lines from 1; the driver moves each range's line numbers on by the lines of
the ranges before it (in the raw spill lines and in the rejects' ``<manifest>:<line>``), so they are the
file's. The manifest's global checks need no global pass: a path listed twice has one id, so one order key
and one partition, where the judge sorts by (key, line) and stops on it naming both lines, as in one process;
the class list and multi-label flag are the union of what the ranges saw; "no rows" is their sum.

Folder trees and OpenImages files are listed in one process (``plan_parts`` returns None): a folder tree's
link-loop check walks the whole tree, an OpenImages file groups an image's rows from anywhere in it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.limits import Limits, Rejected
from data_prep.sources.folders import iter_tars, tar_archives
from data_prep.sources.labels import LabelResolver, Packed, resolved
from data_prep.sources.listing import _check_flags, detect_kind, raw_entry
from data_prep.sources.manifest_ranges import plan_ranges
from data_prep.sources.manifests import csv_header, iter_manifest
from data_prep.sources.packed import PACKED_KINDS
from data_prep.sources.parquet import _parquet_samples
from data_prep.sources.remote import PackedFile, is_url, list_files
from data_prep.sources.webdataset import _info_classes, _tar_samples

PART_KINDS = ("tars", *PACKED_KINDS, "manifest")
PART_FORMAT = 2          # the layout of a part's result; part of its fingerprint
MAX_SEEN = 200           # webdataset: member extensions / json keys a part reports for the no-label message

STREAMED, EARLY, LATE = 0, 1, 2  # reject stages, in the order the one-process listing logs them


@dataclass(frozen=True)
class PartPlan:
    """What every part task needs besides its own files: made once by the driver."""

    kind: str
    src: str
    parts: list[PackedFile]         # in listing order (file name order)
    names: list[str] | None         # webdataset: the class names of our own _info.json beside the shards
    names_from: str
    resolver: LabelResolver | None  # webdataset/parquet: the --label-map, read once by the driver
    context: str                    # sha256 of everything besides a part's own file that its rows depend on
    header: list[str] | None = None  # a CSV manifest's columns: the ranges after the first are read with them

    def fingerprint(self, part: PackedFile) -> str:
        return hashlib.sha256(json.dumps([self.context, part.name, part.location, part.size, part.mtime])
                              .encode()).hexdigest()


def _stat_parts(src, archives: list[tuple[str, str]]) -> list[PackedFile]:
    """Per-class tars as PackedFiles with the size and mtime their fingerprint needs (one stat each)."""
    if is_url(str(src)):
        listed = {f.location: f for f in list_files(src, ".tar")[1]}
        return [PackedFile(name, location, listed[location].size if location in listed else 0,
                           listed[location].mtime if location in listed else 0) for name, location in archives]
    out = []
    for name, location in archives:
        try:
            info = os.stat(location)
            out.append(PackedFile(name, location, info.st_size, info.st_mtime_ns))
        except OSError:  # gone since the folder was read: its task says so in one line, as one process would
            out.append(PackedFile(name, location, -1, -1))
    return out


def plan_parts(src, kind: str, seed: int, label_field: str | None, label_map, limits: Limits) -> PartPlan | None:
    """The parts of SRC, or None when its kind is listed in one process. Raises the one-process listing's
    UserErrors about SRC itself (no tars, no parquet files) before anything is written."""
    kind = detect_kind(src, kind)
    if kind not in PART_KINDS:
        return None
    names, names_from, resolver, header = None, "SRC", None, None
    if kind == "manifest":
        _check_flags(src, kind, None, label_field, label_map)
        is_csv = Path(src).suffix.lower() == ".csv"
        header = csv_header(Path(src), limits) if is_csv else None
        parts = plan_ranges(Path(src), is_csv)
        if len(parts) < 2:  # one range: nothing to spread or resume; no Ray, no OUT state, quick errors
            return None
    elif kind == "tars":
        parts = _stat_parts(src, tar_archives(src)[1])
    else:
        _check_flags(src, kind, None, label_field, label_map)
        base, parts = list_files(src, ".tar" if kind == "webdataset" else ".parquet")
        if not parts:
            from core.errors import UserError

            raise UserError(f"SRC {src} has no {'.tar' if kind == 'webdataset' else '.parquet'} files")
        resolver = LabelResolver(label_map)
        if kind == "webdataset":
            names, names_from = _info_classes(base, parts)
            names_from = names_from or "SRC"
    context = hashlib.sha256(json.dumps([PART_FORMAT, kind, seed, label_field, resolver.map if resolver else None,
                                         names, header, limits.fingerprint_options()], sort_keys=True).encode()
                             ).hexdigest()
    return PartPlan(kind, str(src), parts, names, names_from, resolver, context, header)


def _manifest_rows(plan: PartPlan, part, limits: Limits, summary: dict):
    """(row, line) of one range of a manifest; a lister's reject comes with (line, is its id that line?), so
    the driver can renumber it (``shard.listing_parts``: a range counts its lines from 1)."""
    seen: dict = {}
    for row, lineno in iter_manifest(Path(plan.src), seen, limits, part, plan.header):
        yield row, ((lineno, lineno in seen["line_ids"]) if isinstance(row, Rejected) else lineno)
    summary.update(multi=bool(seen.get("multi")), found=sorted(seen["names"]), lines=seen.get("lines", 0),
                   count=seen.get("rows", 0), cut=bool(seen.get("cut")))


def _rows(plan: PartPlan, part: PackedFile, label_field: str | None, limits: Limits, summary: dict, early: list):
    """(row, None) of one part as the one-process lister yields them; `early` gets the lister's own rejects."""
    if plan.kind == "manifest":
        yield from _manifest_rows(plan, part, limits, summary)
        return
    if plan.kind == "tars":
        for row in iter_tars([(part.name, part.location)], [part.name[: -len(".tar")]]):
            yield row, None
        return
    out = Packed(classes=[])
    if plan.kind == "webdataset":
        seen: dict = {}
        samples, rejects = _tar_samples(part, label_field, seen, limits)
        summary.update(samples=len(samples), members=sorted(seen.get("members", ()))[:MAX_SEEN],
                       json_keys=sorted(seen.get("json", ()))[:MAX_SEEN])
        names, names_from = plan.names, plan.names_from
    else:
        samples, names, damaged = _parquet_samples(part, label_field)
        names_from = "SRC" if names is None else "the parquet metadata (Hugging Face ClassLabel)"
        rejects = [damaged] if damaged is not None else []
        rejects += [(s[0], None, "no_label", "label is null") for s in samples if s[1] is None]
        samples = [s for s in samples if s[1] is not None]
        summary.update(names=names, damaged=damaged is not None)
    early.extend(rejects)
    for row in resolved(iter(samples), plan.resolver, names, names_from, out, list(rejects)):
        yield row, None
    summary.update(multi=out.multi_label, dropped=out.dropped, found=sorted(set(out.classes)),
                   late=[list(r) for r in out.rejects[len(rejects):]])


def list_part(plan: PartPlan, part: PackedFile, seed: int, label_field: str | None, limits: Limits
              ) -> tuple[list[str], list[list], dict]:
    """One part: (its raw spill lines, its rejects as [stage, id, class, reason, detail], a summary)."""
    summary: dict = {"part": part.name}
    early: list[tuple] = []
    lines, rejects = [], []
    for row, line in _rows(plan, part, label_field, limits, summary, early):
        entry = raw_entry(row, line, seed)
        if isinstance(entry, Rejected):
            rejects.append([STREAMED, *entry, *(line if isinstance(line, tuple) else ())])
        else:
            lines.append(json.dumps(entry[1], ensure_ascii=False, separators=(",", ":")) + "\n")
    rejects += [[EARLY, *Rejected(*r)] for r in early]
    rejects += [[LATE, *r] for r in summary.pop("late", [])]
    summary["rows"] = len(lines)
    return lines, rejects, summary
