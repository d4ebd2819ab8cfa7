"""Distributed, resumable listing: Ray tasks list the parts of SRC (``sources.parts``), each part's result is
kept in OUT with a receipt, and the driver merges them into the same judged listing a one-process run makes.

    OUT/_state/{split}.listing/HHHH.jsonl.gz   a part's raw spill lines (its rows, order key first)
    OUT/_state/{split}.listing/HHHH.json       its receipt: the part's fingerprint, the file's size, its rejects
                                               and summary; written after the lines (HHHH: sha256 of its name)

A receipt is written after its part file (both atomically, not fsynced: see ``_write``), so a part with a receipt
whose fingerprint (the file's name, location, size, mtime, plus the seed, label options, limits and format) and
file size still match is complete: a rerun after a kill or a requeue lists only the others. The folder is not
a split's state (``--overwrite`` keeps it: an unchanged part lists the same) and stays when the split is done,
so a rerun of a finished job lists nothing again.

Driver memory stays flat: it holds a few integers per part and one part's lines at a time; the merged rows go
to the local raw spill files, and ``listing.finish_listing`` judges them partition by partition as before.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import re
import zlib
from pathlib import Path

from core import storage
from core.errors import UserError
from core.files import atomic_write_bytes

from data_prep.limits import Rejected, printable
from data_prep.shard.config import ShardConfig, log
from data_prep.shard.judge_tasks import group_judge
from data_prep.shard.layout import STATE_DIR
from data_prep.shard.tasks import SPACE_ERRNOS, OutOfSpace
from data_prep.sources.labels import Packed
from data_prep.sources.listing import PartitionedListing, RejectLog, finish_listing
from data_prep.sources.manifests import sorted_classes
from data_prep.sources.parts import EARLY, LATE, STREAMED, PartPlan, list_part
from data_prep.spill import SpillWriter

_HEX = re.compile(r"[0-9a-f]{2}")
PARTS_PER_TASK = 64  # at most this many parts per Ray task (a task writes each part's result as it finishes it)
JUDGE_RAY_ROWS = 1_000_000  # all parts kept: from this many rows, Ray is worth starting for the judge


def listing_dir(out, split: str):
    """OUT/_state/{split}.listing: a dot cannot be in a split name, so it never collides with a split's state."""
    return storage.join(out, STATE_DIR, f"{split}.listing")


def _paths(out, split: str, name: str):
    stem = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]  # any file name, even not UTF-8
    folder = listing_dir(out, split)
    return storage.join(folder, f"{stem}.jsonl.gz"), storage.join(folder, f"{stem}.json")


def _write(location, data: bytes) -> None:
    """Atomic, not fsynced: a SIGKILL loses nothing written, and what a machine crash could damage (a part file
    or receipt cut short or zeroed) fails its size, gzip CRC or JSON check, so that part is listed again."""
    if storage.is_url(location):
        storage.write_bytes(location, data)
    else:
        atomic_write_bytes(location, data, durable=False)


def _list_and_keep(out, split: str, plan: PartPlan, part, seed: int, label_field, limits) -> int:
    """List one part, write its lines, then its receipt; return its rows + rejects."""
    lines, rejects, summary = list_part(plan, part, seed, label_field, limits)
    data = gzip.compress("".join(lines).encode("utf-8"), compresslevel=1, mtime=0)
    lines_path, receipt_path = _paths(out, split, part.name)
    receipt = {"fingerprint": plan.fingerprint(part), "bytes": len(data), "summary": summary, "rejects": rejects}
    try:
        _write(lines_path, data)
        _write(receipt_path, json.dumps(receipt).encode("ascii"))  # ASCII escapes: a non-UTF-8 file name too
    except OSError as err:  # a full OUT is one line (the driver unwraps a UserError), not a task traceback
        if err.errno in SPACE_ERRNOS:
            raise OutOfSpace(f"OUT {out} is full ({err.strerror or err}) while listing; free space there and "
                             f"re-run the same command: the parts already listed are kept") from None
        raise
    return summary["rows"] + len(rejects)


def list_parts_task(out, split: str, plan: PartPlan, parts: list, seed: int, label_field, limits) -> list[int]:
    """A Ray task: each part listed and kept (``_list_and_keep``) as it is done. Returns rows + rejects per part."""
    return [_list_and_keep(out, split, plan, part, seed, label_field, limits) for part in parts]


def _receipt(cfg: ShardConfig, plan: PartPlan, part) -> dict | None:
    """The part's receipt if it belongs to this part as it is now and its lines are complete, else None."""
    lines_path, receipt_path = _paths(cfg.out, cfg.split, part.name)
    saved = storage.read_json(receipt_path)
    if not isinstance(saved, dict) or saved.get("fingerprint") != plan.fingerprint(part) \
            or not isinstance(saved.get("summary"), dict) or not isinstance(saved.get("rejects"), list):
        return None
    try:
        return saved if storage.size(lines_path) == saved.get("bytes") else None
    except FileNotFoundError:
        return None


def list_in_parts(cfg: ShardConfig, plan: PartPlan, spill, start_ray, run_remote, progress, run_groups=None
                  ) -> PartitionedListing:
    """List the parts without a valid receipt on Ray (``start_ray()`` -> tasks in flight, called only if one
    is needed), then merge every part in listing order into the judged listing (``finish_listing``), judged by
    groups of partitions through ``run_groups`` (``judge_tasks``) when Ray runs anyway or the listing is big."""
    storage.makedirs(listing_dir(cfg.out, cfg.split))
    todo, kept_rows = [], 0
    for part in plan.parts:
        saved = _receipt(cfg, plan, part)
        if saved is None:
            todo.append(part)
        else:
            kept_rows += saved["summary"]["rows"] + len(saved["rejects"])
    done = len(plan.parts) - len(todo)
    if done:
        log(f"resumed listing: {done} of {len(plan.parts)} parts already listed")
    if todo:
        in_flight = start_ray()
        if progress is not None:  # the bar's delay counts from here: a quick listing after Ray's start stays quiet
            progress.reset()
            progress.update(kept_rows)
        per_task = max(1, min(PARTS_PER_TASK, math.ceil(len(todo) / (4 * in_flight))))
        light = dataclasses.replace(plan, parts=[])  # each task gets its own parts, not the whole list
        calls = ((cfg.out, cfg.split, light, todo[i:i + per_task], cfg.seed, cfg.label_field, cfg.limits())
                 for i in range(0, len(todo), per_task))
        listed = [kept_rows]

        def on_result(_index, counts):
            listed[0] += sum(counts)
            if progress is not None:
                progress.update(sum(counts))

        run_remote(list_parts_task, calls, in_flight, on_result)
        kept_rows = listed[0]
    _remove_stale(cfg, plan)
    judge = None
    if run_groups is not None and (todo or kept_rows >= JUDGE_RAY_ROWS):
        start_ray()
        judge = group_judge(run_groups)
    return _merge(cfg, plan, spill, judge)


def _remove_stale(cfg: ShardConfig, plan: PartPlan) -> None:
    """Results of files no longer in SRC (removed or renamed): never read again, so not kept."""
    folder = listing_dir(cfg.out, cfg.split)
    current = {storage.basename(path) for part in plan.parts for path in _paths(cfg.out, cfg.split, part.name)}
    for name in storage.listdir(folder, "*.json*"):
        if name not in current and re.fullmatch(r"[0-9a-f]{32}\.(json|jsonl\.gz)", name):
            storage.remove(storage.join(folder, name))


class _Merged:
    """What the driver keeps of the parts while merging them: counts and the global checks' state."""

    def __init__(self, plan: PartPlan):
        self.plan, self.classes, self.multi, self.dropped = plan, set(), False, 0
        self.samples, self.no_label, self.members, self.json_keys = 0, False, set(), set()
        self.names, self.names_set, self.named_from = None, False, "SRC"
        self.later: list = []  # the parts whose receipts hold EARLY or LATE rejects (read again for them)
        self.later_count = 0
        self.lines = self.rows = 0  # a manifest: the lines of the ranges merged so far; its rows

    def add(self, part, summary: dict, rejects: list) -> None:
        later = sum(r[0] != STREAMED for r in rejects)
        if later:
            self.later.append(part)
            self.later_count += later
        if summary.get("cut"):
            raise UserError(f"manifest {self.plan.src}: a quoted CSV field runs over a line break near byte "
                            f"{part.end:,}; listing in parts cuts the manifest at line breaks: write such fields "
                            f"without line breaks (or write the manifest as JSONL)")
        self.lines += summary.get("lines", 0)
        self.rows += summary.get("count", 0)
        self.multi |= bool(summary.get("multi"))
        self.dropped += summary.get("dropped", 0)
        self.classes.update(summary.get("found", ()))
        self.samples += summary.get("samples", 0)
        self.no_label |= any(r[0] == EARLY and r[3] == "no_label" for r in rejects)
        self.members.update(summary.get("members", ()))
        self.json_keys.update(summary.get("json_keys", ()))
        if self.plan.kind == "parquet" and not summary.get("damaged"):
            if not self.names_set:  # the first readable file's ClassLabel list is the one every file must name
                self.names, self.names_set = summary.get("names"), True
            elif summary.get("names") != self.names:
                raise UserError(f"SRC {self.plan.src}: the parquet files name different ClassLabel lists in their "
                                f"metadata; shard them separately or give a common --label-map")

    def found(self, cfg: ShardConfig) -> Packed:
        plan = self.plan
        if plan.kind == "manifest" and not self.rows:
            raise UserError(f"manifest {plan.src} has no rows")
        if plan.kind == "tars":
            return Packed([p.name[: -len(".tar")] for p in plan.parts], [], False)
        if plan.kind == "webdataset" and not self.samples and self.no_label:
            members = ", ".join(sorted(self.members)) or "none"
            keys = ", ".join(sorted(self.json_keys)) or "none"
            what = f"--label-field {cfg.label_field}" if cfg.label_field else "a .cls member or data_prep's .json"
            raise UserError(f"SRC {plan.src}: no sample has a label ({what}); members seen: {members}; json keys "
                            f"seen: {keys}; name the label with --label-field KEY")
        names = plan.names if plan.kind == "webdataset" else self.names
        source = plan.names_from if plan.kind == "webdataset" else (
            "SRC" if names is None else "the parquet metadata (Hugging Face ClassLabel)")
        classes = list(names) if names is not None and plan.resolver.map is None else sorted_classes(self.classes)
        return Packed(classes, [], self.multi, [], self.dropped, source)


def _merge(cfg: ShardConfig, plan: PartPlan, spill, judge) -> PartitionedListing:
    """Every part's lines -> the raw spill, its rejects -> the reject log, in the one-process order."""
    merged = _Merged(plan)
    log_file = RejectLog(spill / "rejects.jsonl")
    try:
        raw = SpillWriter(spill, "raw")
        try:
            for part in plan.parts:
                saved, lines = _read_part(cfg, plan, part)
                base = merged.lines  # a manifest range's lines are numbered from 1: from here they follow on
                merged.add(part, saved["summary"], saved["rejects"])
                for r in saved["rejects"]:
                    if r[0] == STREAMED:
                        log_file.streamed += 1
                        log_file(_renumbered(plan, r, base) if len(r) > 5 else _rejected(r))
                for line in (lines if not base else (_line_after(line, base) for line in lines)):
                    raw.add_line(int(line[2:4], 16), line)  # '["<key hex>",...': the key's first byte
        finally:
            raw.close()
        found = merged.found(cfg)
        later = itertools.chain(_stage(cfg, merged.later, EARLY), _stage(cfg, merged.later, LATE))
        return finish_listing(cfg.src, plan.kind, cfg.classes_file, found, raw, log_file, spill, None, cfg.limits(),
                              later, merged.later_count, judge=judge)
    finally:
        log_file.handle.close()


def _lines(cfg: ShardConfig, part) -> list[str] | None:
    """One part's raw spill lines, checked (gzip CRC, UTF-8, the line shape); None when damaged or missing."""
    try:
        text = gzip.decompress(storage.read_bytes(_paths(cfg.out, cfg.split, part.name)[0])).decode("utf-8")
    except (OSError, EOFError, ValueError, zlib.error):
        return None
    lines = text.splitlines(keepends=True)
    ok = all(line.startswith('["') and line.endswith("]\n") and _HEX.fullmatch(line[2:4]) for line in lines)
    return lines if ok else None


def _read_part(cfg: ShardConfig, plan: PartPlan, part) -> tuple[dict, list[str]]:
    """(receipt, lines) of a listed part; one whose file turns out damaged is listed again here, in the driver."""
    saved = _receipt(cfg, plan, part)
    lines = _lines(cfg, part) if saved is not None else None
    if lines is None:
        log(f"listing {part.name} again: its result in {listing_dir(cfg.out, cfg.split)} is damaged or gone")
        _list_and_keep(cfg.out, cfg.split, plan, part, cfg.seed, cfg.label_field, cfg.limits())
        saved, lines = _receipt(cfg, plan, part), _lines(cfg, part)
        if saved is None or lines is None:
            raise UserError(f"the listing state of {part.name} in {listing_dir(cfg.out, cfg.split)} cannot be "
                            f"written and read back; check OUT and re-run the same command")
    return saved, lines


def _rejected(r: list):
    return Rejected(*r[1:5])


def _line_after(line: str, base: int) -> str:
    """A manifest row's raw spill line with its line number moved on by `base`: '["<key hex>",<line>,...'. The
    judge breaks order-key ties and names duplicate paths by it, so it must be the line in the whole file."""
    start = line.index('",', 2) + 2
    end = line.index(",", start)
    return f"{line[:start]}{int(line[start:end]) + base}{line[end:]}"


def _renumbered(plan: PartPlan, r: list, base: int) -> Rejected:
    """A manifest row's reject, `<manifest>:<line>` in its detail (and its id, where the row had no path)
    counted from the file's first line, as the one-process lister writes it."""
    _stage_, file_id, class_name, reason, detail, lineno, id_is_line = r
    name = Path(plan.src).name
    old, new = f"{name}:{lineno}", f"{name}:{lineno + base}"
    if detail.startswith(old + ":"):
        detail = new + detail[len(old):]
    return Rejected(printable(new) if id_is_line else file_id, class_name, reason, detail)


def _stage(cfg: ShardConfig, parts: list, stage: int):
    """The rejects of one stage, part by part in listing order (only parts that have any are read again)."""
    for part in parts:
        saved = storage.read_json(_paths(cfg.out, cfg.split, part.name)[1])
        for r in saved["rejects"]:
            if r[0] == stage:
                yield _rejected(r)
