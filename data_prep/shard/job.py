"""The shard job: check OUT, list, scan (Ray), plan, write shards (Ray), describe the result.

See data_prep/__main__.py for the design and the exactly-once argument. This module is the driver: it
never decodes an image itself, it decides what every task does and records what they did.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from core import storage
from core.errors import UserError
from core.files import atomic_path, owned_temp_dir
from core.storage import Location

from data_prep.images import ImageOptions
from data_prep.shard.info import drop_split, load_info, merge_split
from data_prep.shard.layout import (INFO_NAME, REJECTS_NAME, STATE_DIR, plan_path, remove_stale_shard_temps, scan_receipt_path,
                     shard_name, split_shards, state_dir)
from data_prep.shard.layout import inputs_path as layout_inputs_path
from data_prep.shard.plan import shard_ranges
from data_prep.spill import PARTITIONS, SpillWriter, external_sort, order_key, read_spill
from data_prep.sources.listing import PartitionedListing, list_partitioned
from data_prep.shard.tasks import SPACE_ERRNOS, OutOfSpace, file_sha256, read_scanned

SCAN_TASK_ROWS = 100_000  # at most about this many inputs per scan task (unless one partition holds more)
PLAN_FORMAT = 2   # plan.json.gz: per-partition counts and the --dedup duplicates, never the entries

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class ShardConfig:
    src: Location                        # a Path, or an object-store URL string (core.storage.as_location)
    out: Location
    split: str = "train"
    source: str = "auto"                 # auto | folder | tars | manifest | openimages | webdataset | parquet
    classes_file: Path | None = None
    images: Path | None = None           # OpenImages: the folder holding <ImageID>.jpg
    label_field: str | None = None       # webdataset/parquet sources: JSON key, member extension or column
    label_map: Path | None = None        # webdataset/parquet sources: raw label -> class name
    shard_size: int = 1000
    seed: int = 0
    max_size: int = 256
    max_aspect: float = 4.0
    quality: int = 90
    max_pixels: int = 89_478_485
    dedup: bool = False
    workers: int | None = None
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True

    def image_options(self) -> ImageOptions:
        return ImageOptions(max_size=self.max_size, max_aspect=self.max_aspect, quality=self.quality,
                            max_pixels=self.max_pixels)

    def output_options(self, kind: str) -> dict:
        """Every option that changes the output bytes: a different value means a different job."""
        return {"split": self.split, "source": kind, "shard_size": self.shard_size, "seed": self.seed,
                "dedup": self.dedup, **asdict(self.image_options())}  # the class list is in the input fingerprint


@dataclass
class JobResult:
    split: str
    num_samples: int
    num_shards: int
    resumed_shards: int
    rejected: int
    duplicates: int
    bytes: int
    seconds: float
    phases: dict           # seconds per phase: list, ray_start, scan, write
    nodes: dict
    task_cpu_seconds: float = 0.0  # CPU time of the shard-writing tasks (not resumed ones)
    up_to_date: bool = False

    @property
    def images_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _inside(out: Location, src: Location) -> bool:
    """OUT is SRC or below it (the shards would be listed as inputs)."""
    if storage.is_url(out) != storage.is_url(src):
        return False
    if storage.is_url(out):
        return str(out) == str(src) or str(out).startswith(str(src).rstrip("/") + "/")
    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    return Path(src).is_dir() and (out_path == src_path or src_path in out_path.parents)


def _check_paths(cfg: ShardConfig) -> None:
    if not _SPLIT_NAME.match(cfg.split):
        raise UserError(f"--split {cfg.split!r}: use letters, digits and '_' only (it names files and keys)")
    if not storage.is_url(cfg.out) and cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"OUT {cfg.out} is a file; give a folder for the shards")
    storage.require_bucket(cfg.out)
    if _inside(cfg.out, cfg.src):
        raise UserError(f"OUT {cfg.out} is inside SRC {cfg.src}; the shards would be read as inputs, choose "
                        f"another OUT")


def _remove_split(out: Location, split: str) -> None:
    for path in split_shards(out, split):
        storage.remove(path)
    remove_stale_shard_temps(out, split)
    storage.remove_tree(state_dir(out, split))
    drop_split(out, split)


def _changed(old: dict, new: dict) -> str:
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    return ", ".join(diffs) if diffs else "the input files or the class list changed"


def _verify_complete(out: Location, entry: dict) -> bool:
    for shard in entry.get("shards", []):
        path = storage.join(out, shard["filename"])
        try:
            same = storage.size(path) == shard["bytes"] and file_sha256(path) == shard["sha256"]
        except FileNotFoundError:
            same = False
        if not same:
            _log(f"shard {shard['filename']} is missing or damaged; rewriting what is needed")
            return False
    return True


def _refuse_foreign_out(cfg: ShardConfig) -> None:
    """Never write into a non-empty folder (or prefix) that is not a shard folder (unless told to)."""
    out = cfg.out
    had_files = storage.has_entries(out)
    ours = storage.exists(storage.join(out, INFO_NAME)) or storage.exists(storage.join(out, STATE_DIR))
    if had_files and not ours and not cfg.overwrite:
        raise UserError(f"OUT {out} is not empty and holds no shards of ours (no {INFO_NAME}); choose an empty "
                        f"folder, or pass --overwrite to write into it anyway")


def _prepare_out(cfg: ShardConfig, fingerprint: str, options: dict) -> bool:
    """Refuse a different job on an existing OUT; return True if this exact split is already complete."""
    out, split = cfg.out, cfg.split
    info = load_info(out)
    entry = info.get("splits", {}).get(split)
    saved = _load_plan(out, split)
    if cfg.overwrite:
        _remove_split(out, split)
        return False
    what = f"OUT {out} already holds split {split!r}"
    if entry is not None and entry.get("fingerprint") != fingerprint:
        raise UserError(f"{what} made from other inputs or options ({_changed(entry.get('options', {}), options)}); "
                        f"pass --overwrite to replace it, or choose another OUT or --split")
    if saved is not None and saved["fingerprint"] != fingerprint:
        raise UserError(f"{what} from an unfinished job with other inputs or options "
                        f"({_changed(saved.get('options', {}), options)}); re-run that command to finish "
                        f"it, or pass --overwrite to replace it")
    if entry is None and saved is None and split_shards(out, split):
        raise UserError(f"{what} as {split}-*.tar files that {INFO_NAME} does not describe; pass --overwrite "
                        f"to replace them, or choose another OUT or --split")
    return entry is not None and saved is None and _verify_complete(out, entry)


def _load_plan(out: Location, split: str) -> dict | None:
    """The saved plan (a dict of O(partitions) numbers), or None when missing, unreadable or of another format."""
    try:
        data = storage.read_bytes(plan_path(out, split))
        plan = json.loads(gzip.decompress(data))
    except (FileNotFoundError, OSError, ValueError, EOFError):
        return None
    return plan if isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT else None


def _save_plan(plan: dict, out: Location, split: str) -> None:
    """Local: atomically into _state/. Object store: created only if absent (a conditional PUT): of two jobs
    that scanned the same split at once, the second stops here instead of writing beside the first."""
    path = plan_path(out, split)
    data = gzip.compress(json.dumps(plan).encode("utf-8"), mtime=0)
    if not storage.is_url(path):
        Path(state_dir(out, split)).mkdir(parents=True, exist_ok=True)
        storage.write_bytes(path, data)
        return
    try:
        storage.write_bytes(path, data, exclusive=True)
    except FileExistsError:
        raise UserError(f"another data_prep job is writing split {split!r} into {out} (its plan {path} appeared "
                        f"while this job scanned); wait for it to end. If no other job runs, delete "
                        f"{state_dir(out, split)} and re-run") from None


@contextmanager
def _split_lock(out: Location, split: str):
    """One job per split of a local OUT (flock: released by the kernel when a job dies).

    An object store has no lock files, and a lock object left by a killed job would block its re-run. Its
    guards instead: the plan object is created with a conditional PUT (`_save_plan`), so two jobs that start
    a split at once do not both write it; two runs of the *same* command (same plan) write the same bytes
    into whole objects and only waste work; and _info.json/rejects.jsonl are compare-and-swapped
    (data_prep.shard.info). Running two jobs on one split of an object store at once is the user's call.
    """
    if storage.is_url(out):
        yield
        return
    path = Path(out) / STATE_DIR / f"{split}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another data_prep job is writing split {split!r} into {out}; wait for it to end") \
                from None
        yield


def _unwrap_task_error(err: Exception) -> Exception:
    """A UserError raised inside a task (InputChanged, OutOfSpace) reaches the user as one line, not a Ray
    traceback; it keeps its type, so the driver can add what only it knows."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else err


def _run_tasks(remote, calls, in_flight: int, on_result) -> None:
    """Submit calls (a list or any iterable, consumed lazily: the driver builds a call only when there is
    room for it) keeping at most `in_flight` outstanding; hand each result to on_result(index, result)."""
    import ray

    pending, calls, index = {}, iter(calls), 0
    exhausted = False
    while True:
        while not exhausted and len(pending) < in_flight:
            call = next(calls, None)
            if call is None:
                exhausted = True
                break
            ref = remote.options(scheduling_strategy="SPREAD").remote(*call)
            pending[ref] = index
            index += 1
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            number = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise _unwrap_task_error(err) from None
            on_result(number, result)


def _run_remote(fn, calls, in_flight: int, on_result) -> None:
    """`fn` as Ray tasks (one CPU each, retried if a worker dies)."""
    import ray

    _run_tasks(ray.remote(num_cpus=1, max_retries=3)(fn), calls, in_flight, on_result)


def _scan(listing: PartitionedListing, cfg: ShardConfig, fingerprint: str, in_flight: int, bar: tqdm,
          synthetic: bool = False) -> list[dict]:
    """Scan every partition not scanned yet for this fingerprint (a resumed job keeps the others); return the
    scan receipts of all partitions. The driver copies a partition's inputs file (streamed) to
    OUT/_state/<split>/inputs/ just before its task is submitted, and a task gets only partition numbers (up
    to about SCAN_TASK_ROWS rows of them): neither the driver nor Ray's object store holds the inputs."""
    from data_prep.shard.tasks import scan_partitions

    receipts: list[dict | None] = [None] * PARTITIONS
    todo = []
    for part in range(PARTITIONS):
        if not listing.counts[part]:
            receipts[part] = {"partition": part, "inputs": 0, "usable": 0, "usable_bytes": 0, "rejects": []}
            continue
        saved = storage.read_json(scan_receipt_path(cfg.out, cfg.split, part))
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            receipts[part] = saved
            bar.update(saved["inputs"])
        else:
            todo.append(part)
    left = sum(listing.counts[p] for p in todo)
    chunk = max(16, min(SCAN_TASK_ROWS, math.ceil(left / (4 * in_flight))))  # whole partitions, about this many rows

    def calls():
        group, rows = [], 0
        for part in todo:
            try:
                _publish_inputs(listing, cfg, part)
            except OSError as err:  # OUT filled up while the scan state is written: the scan's one line
                if err.errno in SPACE_ERRNOS:
                    raise OutOfSpace(f"{err.strerror or err} writing the scan inputs") from None
                raise
            group.append(part)
            rows += listing.counts[part]
            if rows >= chunk:
                yield str(cfg.out), cfg.split, fingerprint, group, cfg.max_pixels, synthetic
                group, rows = [], 0
        if group:
            yield str(cfg.out), cfg.split, fingerprint, group, cfg.max_pixels, synthetic

    def collect(_index, done):
        for receipt in done:
            receipts[receipt["partition"]] = receipt
            bar.update(receipt["inputs"])

    try:
        _run_remote(scan_partitions, calls(), in_flight, collect)
    except OutOfSpace as err:
        need = listing.input_bytes * (1 + sum(r is None for r in receipts) / max(1, PARTITIONS))
        where = f"the temp folder {tempfile.gettempdir()} (TMPDIR) or OUT" if storage.is_url(cfg.out) else "OUT"
        raise UserError(f"{where} {cfg.out} is full ({err}) while scanning: about {need / 1e6:,.1f} MB more are "
                        f"needed for the scan state and the shards (about the inputs' size); free space there and "
                        f"re-run the same command: the partitions already scanned are kept") from None
    return receipts  # type: ignore[return-value]


def _publish_inputs(listing: PartitionedListing, cfg: ShardConfig, part: int) -> None:
    """The local spill of one partition -> OUT/_state/<split>/inputs/PPP.jsonl, where its scan task reads it."""
    target = layout_inputs_path(cfg.out, cfg.split, part)
    if storage.is_url(target):
        storage.upload(listing.inputs_path(part), str(target))
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, durable=False) as tmp:  # rewritten by every run that scans it: no fsync needed
        shutil.copyfile(listing.inputs_path(part), tmp)


def _dedup(cfg: ShardConfig) -> dict[str, str]:
    """--dedup: {id of a later copy: id of the kept copy} (the first copy of equal sha1s in id order).

    Equal bytes can sit in any two order partitions, so the usable inputs' (sha1, id) pairs are spilled once
    to local files by the sha1's first byte (``spill.SpillWriter``); each bucket is then resolved alone. The
    driver holds one bucket (1/256 of the usable inputs: ~4M pairs at 1B images) plus the duplicates found,
    instead of one id per distinct sha1 of the whole split."""
    duplicates: dict[str, str] = {}
    with owned_temp_dir("data_prep-dedup-", on_removed=lambda p: _log(f"removed {p}: the --dedup spill of a "
                                                                      f"killed job")) as tmp:
        buckets = SpillWriter(tmp, "sha1")
        try:
            for part in range(PARTITIONS):
                for row in read_scanned(cfg.out, cfg.split, part):
                    if row[7] is None:  # usable: row[1] the id, row[11] the sha1 (hex) of its bytes
                        buckets.add(int(row[11][:2], 16), [row[11], row[1]])
        finally:
            buckets.close()
        for bucket, count in enumerate(buckets.counts):
            if not count:
                continue
            pairs = list(read_spill(buckets.path(bucket)))
            first: dict[str, str] = {}
            for sha1, file_id in pairs:
                if sha1 not in first or file_id < first[sha1]:
                    first[sha1] = file_id
            duplicates.update((file_id, first[sha1]) for sha1, file_id in pairs if first[sha1] != file_id)
            buckets.path(bucket).unlink()
    return dict(sorted(duplicates.items()))


def plan_job(listing: PartitionedListing, cfg: ShardConfig, fingerprint: str, options: dict, in_flight: int,
             bar: tqdm, synthetic: bool = False) -> dict:
    """Scan (resumable per partition) and plan: the per-partition usable counts, the duplicates, the shards'
    ranges follow from them (``plan.shard_ranges``). ``synthetic``: no image is read (benchmarks)."""
    scans = _scan(listing, cfg, fingerprint, in_flight, bar, synthetic)
    duplicates = _dedup(cfg) if cfg.dedup else {}
    usable = [r["usable"] for r in scans]
    for file_id in duplicates:
        usable[order_key(file_id, cfg.seed)[0]] -= 1
    return {"format": PLAN_FORMAT, "fingerprint": fingerprint, "options": options, "usable": usable,
            "usable_bytes": sum(r.get("usable_bytes", 0) for r in scans), "duplicates": duplicates}


def _write(plan: dict, shards: list, classes: list[str], cfg: ShardConfig, in_flight: int, bar: tqdm) -> list[dict]:
    from data_prep.shard.tasks import write_planned_shard

    options = asdict(cfg.image_options())
    parts_dups: dict[int, dict[str, str]] = {}
    for file_id, kept in plan["duplicates"].items():
        parts_dups.setdefault(order_key(file_id, cfg.seed)[0], {})[file_id] = kept
    calls = ((str(cfg.out), cfg.split, shard_name(cfg.split, i), ranges, classes,
              {k: v for p, _a, _b in ranges for k, v in parts_dups.get(p, {}).items()}, options)
             for i, ranges in enumerate(shards))
    receipts: list[dict | None] = [None] * len(shards)
    resumed = 0

    def collect(index, receipt):
        nonlocal resumed
        receipts[index] = receipt
        resumed += bool(receipt.get("resumed"))
        bar.update(receipt["planned"])
        bar.set_postfix(shards=f"{sum(r is not None for r in receipts)}/{len(shards)}", resumed=resumed,
                        refresh=False)

    try:
        _run_remote(write_planned_shard, calls, in_flight, collect)
    except OutOfSpace as err:
        raise UserError(_space_message(cfg.out, str(err), plan, shards, receipts)) from None
    return receipts  # type: ignore[return-value]


def _shard_len(ranges) -> int:
    return sum(b - a for _p, a, b in ranges)


def _space_message(out: Location, cause: str, plan: dict, shards: list, receipts: list) -> str:
    """One line: OUT is full, about how much more the shards not yet written need, and that a re-run resumes."""
    done = [i for i, r in enumerate(receipts) if r is not None]
    left = [i for i, r in enumerate(receipts) if r is None]
    samples_done = sum(_shard_len(shards[i]) for i in done)
    samples_left = sum(_shard_len(shards[i]) for i in left)
    if samples_done and sum(receipts[i]["bytes"] for i in done):
        per_sample = sum(receipts[i]["bytes"] for i in done) / samples_done
    else:  # nothing written yet: the inputs' mean size (re-encoded images are usually smaller)
        per_sample = plan.get("usable_bytes", 0) / max(1, sum(plan["usable"]))
    need = per_sample * samples_left
    if storage.is_url(out):  # the local temp folder where shards wait for their upload ran out of space
        where = tempfile.gettempdir()
        return (f"the temp folder {where} (TMPDIR), where each shard is written before its upload to OUT {out}, is "
                f"full ({cause}); shards are about {need / max(1, len(left)) / 1e6:,.1f} MB each; point TMPDIR at "
                f"a bigger disk and re-run the same command: the {len(done)} finished shards are kept")
    free = shutil.disk_usage(out).free
    return (f"OUT {out} is full ({cause}): about {need / 1e6:,.1f} MB more are needed for the {len(left)} shards "
            f"not yet written ({free / 1e6:,.1f} MB free now); free space there and re-run the same command: the "
            f"{len(done)} finished shards are kept")


def _space_error(out: Location, err: OSError) -> UserError:
    return UserError(f"OUT {out} is full ({err.strerror or err}{f': {err.filename}' if err.filename else ''}); "
                     f"free space there and re-run the same command: finished shards are kept")


class _Rejects:
    """Every reject of the split (listing, scan, --dedup duplicates, full decode), iterable any number of times.

    ``iter()`` gives them sorted by source, through ``spill.external_sort`` (runs spilled to the listing's temp
    folder), so rejects.jsonl is written without holding them all; ``reasons()`` counts them unsorted."""

    def __init__(self, cfg: ShardConfig, listing: PartitionedListing, plan: dict, late: list[dict]):
        self.cfg, self.listing, self.plan, self.late = cfg, listing, plan, late

    def unsorted(self):
        cfg, listing = self.cfg, self.listing
        yield from read_spill(listing.rejects_path)
        for part in range(PARTITIONS):
            if listing.counts[part]:
                yield from storage.read_json(scan_receipt_path(cfg.out, cfg.split, part))["rejects"]
        duplicates = self.plan["duplicates"]
        if duplicates:  # the class of each duplicate (as many as --dedup already holds)
            classes = {}
            for part in range(PARTITIONS):
                for row in read_scanned(cfg.out, cfg.split, part):
                    if row[1] in duplicates:
                        classes[row[1]] = row[2]
            for i, kept in duplicates.items():
                yield {"source": i, "class": classes.get(i), "reason": "duplicate", "detail": f"same bytes as {kept}"}
        yield from self.late

    def reasons(self) -> Counter:
        return Counter(r["reason"] for r in self.unsorted())

    def __iter__(self):
        return external_sort(self.unsorted(), lambda r: r["source"], self.listing.directory)


def _split_entry(cfg: ShardConfig, listing: PartitionedListing, plan: dict, receipts: list[dict], options: dict,
                 seconds: float, phases: dict) -> tuple[dict, _Rejects]:
    late = [r for receipt in receipts for r in receipt["rejects"]]
    rejects = _Rejects(cfg, listing, plan, late)
    reasons = rejects.reasons()
    per_class = Counter()
    for receipt in receipts:
        per_class.update(receipt["per_class"])
    written = sum(r["num_samples"] for r in receipts)
    label_total = sum(r["labels_per_image"][0] for r in receipts)
    per_image = {"mean": round(label_total / written, 4) if written else 0.0,
                 "max": max((r["labels_per_image"][1] for r in receipts), default=0)}
    counts = {
        "listed": listing.listed,
        "planned": sum(plan["usable"]),
        "duplicates": len(plan["duplicates"]),
        "non_image_files": listing.non_image_files,
        "rejected": dict(sorted(reasons.items())),
        "unknown_labels_dropped": listing.unknown_labels_dropped,
        "written": written,
        "per_class": {name: per_class.get(name, 0) for name in listing.classes},
    }
    nodes = Counter(r["node_id"] for r in receipts if not r.get("resumed"))  # who wrote what, this run
    cpu_seconds = sum(r.get("cpu_seconds", 0.0) for r in receipts if not r.get("resumed"))
    shards = [{"filename": r["filename"], "num_samples": r["num_samples"], "bytes": r["bytes"],
               "sha256": r["sha256"]} for r in receipts]
    entry = {
        "name": cfg.split,
        "num_samples": counts["written"],
        "filenames": [s["filename"] for s in shards],
        "shard_lengths": [s["num_samples"] for s in shards],
        "shards": shards,
        "classes": listing.classes,
        "multi_label": listing.multi_label,
        "labels_per_image": per_image,
        "options": options,
        "fingerprint": plan["fingerprint"],
        "source": {"path": str(cfg.src), "kind": listing.kind, "classes_from": listing.class_source,
                   **({"images": str(cfg.images)} if cfg.images is not None else {})},
        "counts": counts,
        "run": {"nodes": dict(sorted(nodes.items())), "resumed_shards": sum(bool(r.get("resumed")) for r in receipts),
                "seconds": round(seconds, 3), "phases": phases, "task_cpu_seconds": round(cpu_seconds, 3),
                "workers": cfg.workers, "ray_address": cfg.ray_address},
    }
    return entry, rejects


def _summary(result: JobResult, counts: dict, out: Location) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in counts.get("rejected", {}).items()) or "none"
    nodes = ", ".join(f"{node[:8]}:{n}" for node, n in result.nodes.items()) or "-"
    return (f"shard {result.split}: wrote {result.num_samples} images in {result.num_shards} shards "
            f"({result.resumed_shards} kept from an earlier run), rejected {result.rejected} ({rejected}), "
            f"duplicates {result.duplicates}, {result.bytes / 1e6:.2f} MB, {result.seconds:.1f} s, "
            f"{result.images_per_s:.0f} images/s; shards written per node: {nodes}; "
            f"see {storage.join(out, INFO_NAME)} and {storage.join(out, REJECTS_NAME)}")


def _up_to_date(cfg: ShardConfig, start: float) -> JobResult:
    entry = load_info(cfg.out)["splits"][cfg.split]
    result = JobResult(cfg.split, entry["num_samples"], len(entry["filenames"]), len(entry["filenames"]),
                       sum(entry["counts"]["rejected"].values()), entry["counts"]["duplicates"],
                       sum(s["bytes"] for s in entry["shards"]), time.perf_counter() - start, {}, {},
                       up_to_date=True)
    print(f"shard {cfg.split}: {cfg.out} is up to date ({result.num_samples} images in {result.num_shards} "
          f"verified shards); nothing to do")
    return result


def run_shard_job(cfg: ShardConfig) -> JobResult:
    """The whole job; a full OUT (the driver's own writes: plan, receipts' folder, _info.json) is one line too."""
    try:
        with storage.user_errors(cfg.out, "use it as OUT"):
            return _run_shard_job(cfg)
    except OSError as err:
        if err.errno in SPACE_ERRNOS:
            raise _space_error(cfg.out, err) from None
        raise


def _run_shard_job(cfg: ShardConfig) -> JobResult:
    _check_paths(cfg)
    # The listing is spilled to a local temp folder: OUT may not exist yet (or not be ours), and it is
    # re-listed on every run anyway (that is how a changed input is noticed). Spills of killed jobs go first.
    with owned_temp_dir("data_prep-list-", on_removed=lambda p: _log(f"removed {p}: the listing spill of a "
                                                                     f"killed job")) as spill:
        return _run_listed(cfg, spill)


def _run_listed(cfg: ShardConfig, spill: Path) -> JobResult:
    start = time.perf_counter()
    listed = tqdm(desc=f"list {cfg.split}", unit="row", disable=not cfg.progress, leave=False, mininterval=1.0,
                  delay=2.0)  # shown only when listing takes a while: a quick error stays one line
    try:
        with storage.user_errors(cfg.src, "list it as SRC"):
            listing = list_partitioned(cfg.src, cfg.source, cfg.classes_file, cfg.seed, spill, images=cfg.images,
                                       label_field=cfg.label_field, label_map=cfg.label_map, progress=listed)
    finally:
        listed.close()
    phases = {"list": round(time.perf_counter() - start, 3)}
    options = cfg.output_options(listing.kind)
    fingerprint = hashlib.sha256(json.dumps({"options": options, "inputs": listing.fingerprint},
                                            sort_keys=True).encode()).hexdigest()
    _refuse_foreign_out(cfg)
    storage.makedirs(cfg.out)
    with _split_lock(cfg.out, cfg.split):
        if _prepare_out(cfg, fingerprint, options):
            return _up_to_date(cfg, start)
        remove_stale_shard_temps(cfg.out, cfg.split)  # left by a killed run; never a complete shard
        from data_prep.shard.cluster import ray_session

        ray_start = time.perf_counter()
        with ray_session(cfg.ray_address, cfg.workers) as session:
            phases["ray_start"] = round(time.perf_counter() - ray_start, 3)
            _log(f"shard {cfg.split}: {listing.num_inputs} image files, {len(listing.classes)} classes; Ray ready "
                 f"in {time.perf_counter() - ray_start:.1f} s ({session.nodes} node(s), {session.cpus} CPUs)")
            # One bar for the whole job: scan (one unit per input) then write (one per planned image); its rate
            # and ETA cover both phases. The write total is the input count until the scan says how many passed.
            bar = tqdm(total=2 * listing.num_inputs, desc=f"shard {cfg.split} [scan]", unit="img",
                       disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
            try:
                plan = _load_plan(cfg.out, cfg.split)
                if plan is None or plan["fingerprint"] != fingerprint:
                    scan_start = time.perf_counter()
                    plan = plan_job(listing, cfg, fingerprint, options, session.in_flight, bar)
                    _save_plan(plan, cfg.out, cfg.split)
                    phases["scan"] = round(time.perf_counter() - scan_start, 3)
                    _log(f"shard {cfg.split}: scanned {listing.num_inputs} files in "
                         f"{time.perf_counter() - scan_start:.1f} s: {sum(plan['usable'])} usable")
                else:
                    bar.update(listing.num_inputs)
                    _log(f"shard {cfg.split}: resuming the saved plan ({sum(plan['usable'])} images)")
                usable = sum(plan["usable"])
                if usable == 0:
                    merge_split(cfg.out, cfg.split, None, _Rejects(cfg, listing, plan, []))
                    raise UserError(f"SRC {cfg.src}: none of the {listing.num_inputs} image files is usable; "
                                    f"see {storage.join(cfg.out, REJECTS_NAME)}")
                shards = shard_ranges(plan["usable"], cfg.shard_size)
                bar.total = bar.n + usable
                bar.set_description(f"shard {cfg.split} [write]")
                write_start = time.perf_counter()
                receipts = _write(plan, shards, listing.classes, cfg, session.in_flight, bar)
                phases["write"] = round(time.perf_counter() - write_start, 3)
            finally:
                bar.close()
        remove_stale_shard_temps(cfg.out, cfg.split)  # temp files of workers killed mid-shard (retried)
        seconds = time.perf_counter() - start
        entry, rejects = _split_entry(cfg, listing, plan, receipts, options, seconds, phases)
        merge_split(cfg.out, cfg.split, entry, rejects)
        storage.remove(plan_path(cfg.out, cfg.split))  # receipts stay: they make a re-run cheap
        storage.remove_tree(storage.join(state_dir(cfg.out, cfg.split), "scan"))  # only a resumed plan reads them
        storage.remove_tree(storage.join(state_dir(cfg.out, cfg.split), "inputs"))
    counts = entry["counts"]
    result = JobResult(cfg.split, entry["num_samples"], len(receipts), entry["run"]["resumed_shards"],
                       sum(counts["rejected"].values()),
                       counts["duplicates"], sum(s["bytes"] for s in entry["shards"]), seconds, phases,
                       entry["run"]["nodes"], entry["run"]["task_cpu_seconds"])
    print(_summary(result, counts, cfg.out))
    return result
