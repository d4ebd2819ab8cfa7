"""The shard job: check OUT, list, scan (Ray), plan, write shards (Ray), describe the result.

See data_prep/__main__.py for the design and the exactly-once argument. This module is the driver: it
never decodes an image itself, it decides what every task does and records what they did.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from core import storage
from core.errors import UserError
from core.files import atomic_path, owned_temp_dir

from data_prep.near_dup.exclude import build_eval_index, list_eval_sets, near_entry, near_options
from data_prep.shard.config import JobResult, ShardConfig, log
from data_prep.shard.info import merge_split
from data_prep.shard.layout import (REJECTS_NAME, plan_path, remove_stale_shard_temps, scan_receipt_path, shard_name,
                                    state_dir)
from data_prep.shard.layout import inputs_path as layout_inputs_path
from data_prep.shard.judge_tasks import run_on_driver_node
from data_prep.shard.listing_parts import list_in_parts
from data_prep.shard.out import (PLAN_FORMAT, check_paths, load_plan, prepare_out, refuse_foreign_out, save_plan,
                                 space_error, space_message, split_lock)
from data_prep.shard.plan import shard_ranges
from data_prep.shard.report import Rejects, split_entry, summary, up_to_date
from data_prep.shard.tasks import SPACE_ERRNOS, OutOfSpace, read_scanned
from data_prep.sources.class_map import packed_label_map
from data_prep.sources.packed import PACKED_KINDS
from data_prep.sources.listing import PartitionedListing, detect_kind, list_partitioned
from data_prep.sources.parts import plan_parts
from data_prep.spill import PARTITIONS, SpillWriter, order_key, read_spill

__all__ = ["JobResult", "ShardConfig", "plan_job", "run_shard_job"]  # ShardConfig/JobResult: config.py

SCAN_TASK_ROWS = 100_000  # at most about this many inputs per scan task (unless one partition holds more)


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
          synthetic: bool = False, near=None) -> list[dict]:
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

    image_options = asdict(cfg.image_options())

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
                yield str(cfg.out), cfg.split, fingerprint, group, cfg.max_pixels, synthetic, image_options, near
                group, rows = [], 0
        if group:
            yield str(cfg.out), cfg.split, fingerprint, group, cfg.max_pixels, synthetic, image_options, near

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
    with owned_temp_dir("data_prep-dedup-", on_removed=lambda p: log(f"removed {p}: the --dedup spill of a "
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
             bar: tqdm, synthetic: bool = False, near=None) -> dict:
    """Scan (resumable per partition) and plan: the per-partition usable counts, the duplicates, the shards'
    ranges follow from them (``plan.shard_ranges``). ``synthetic``: no image is read (benchmarks). ``near``:
    the --exclude-near index's object ref (``near_dup.exclude``)."""
    scans = _scan(listing, cfg, fingerprint, in_flight, bar, synthetic, near)
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
        raise UserError(space_message(cfg.out, str(err), plan, shards, receipts)) from None
    return receipts  # type: ignore[return-value]


def _eval_index(eval_sets: list, cfg: ShardConfig, in_flight: int):
    """--exclude-near: the eval sets' index, put once into Ray's object store (its ref, or None without it)."""
    if not eval_sets:
        return None
    import ray

    index = build_eval_index(eval_sets, cfg.out, asdict(cfg.image_options()), cfg.near_distance, in_flight, log)
    return ray.put(index)


def run_shard_job(cfg: ShardConfig) -> JobResult:
    """The whole job; a full OUT (the driver's own writes: plan, receipts' folder, _info.json) is one line too."""
    try:
        with storage.user_errors(cfg.out, "use it as OUT"):
            return _run_shard_job(cfg)
    except OSError as err:
        if err.errno in SPACE_ERRNOS:
            raise space_error(cfg.out, err) from None
        raise


def _run_shard_job(cfg: ShardConfig) -> JobResult:
    check_paths(cfg)
    # The listing is spilled to a local temp folder: OUT may not exist yet (or not be ours), and it is
    # re-listed on every run anyway (that is how a changed input is noticed). Spills of killed jobs go first.
    with owned_temp_dir("data_prep-list-", on_removed=lambda p: log(f"removed {p}: the listing spill of a "
                                                                     f"killed job")) as spill:
        return _run_listed(cfg, spill)


def _list(cfg: ShardConfig, spill: Path, stack: ExitStack, ray: "_LazyRay") -> tuple[PartitionedListing, bool]:
    """(the judged listing, whether OUT is claimed already). Per-class tars, webdataset tars, parquet files and
    CSV/JSONL manifests are listed in parts by Ray tasks whose results are kept in OUT (``listing_parts``): OUT
    is claimed and locked first. Other kinds are listed in this process, before OUT is touched."""
    listed = tqdm(desc=f"list {cfg.split}", unit="row", disable=not cfg.progress, leave=False, mininterval=1.0,
                  delay=2.0)  # shown only when listing takes a while: a quick error stays one line
    try:
        with storage.user_errors(cfg.src, "list it as SRC"):
            parts = None
            if cfg.list_in_parts and cfg.images is None:  # --images: OpenImages, or one process says it is not
                kind = detect_kind(cfg.src, cfg.source)
                parts = plan_parts(cfg.src, kind, cfg.seed, cfg.label_field,
                                   packed_label_map(cfg.classes_file, cfg.label_map, kind in PACKED_KINDS), cfg.limits())
            if parts is None:
                return list_partitioned(cfg.src, cfg.source, cfg.classes_file, cfg.seed, spill, images=cfg.images,
                                        label_field=cfg.label_field, label_map=cfg.label_map, progress=listed,
                                        limits=cfg.limits()), False
        _claim_out(cfg, stack)  # the driver's side of the parts touches OUT only (the tasks read SRC)
        return list_in_parts(cfg, parts, spill, ray.in_flight, _run_remote, listed, run_on_driver_node), True
    finally:
        listed.close()


def _claim_out(cfg: ShardConfig, stack: ExitStack) -> None:
    """Refuse a foreign OUT, create it, and hold the split's lock until the job ends."""
    refuse_foreign_out(cfg)
    storage.makedirs(cfg.out)
    stack.enter_context(split_lock(cfg.out, cfg.split))


class _LazyRay:
    """The job's Ray session, started on first use: a rerun whose parts are all listed and whose split is up to
    date starts no Ray at all."""

    def __init__(self, cfg: ShardConfig, stack: ExitStack):
        self.cfg, self.stack, self.session, self.seconds = cfg, stack, None, 0.0

    def get(self):
        if self.session is None:
            from data_prep.shard.cluster import ray_session

            ray_start = time.perf_counter()
            self.session = self.stack.enter_context(ray_session(self.cfg.ray_address, self.cfg.workers))
            self.seconds = time.perf_counter() - ray_start
        return self.session

    def in_flight(self) -> int:
        return self.get().in_flight

    @contextmanager
    def started(self):
        """The session (started now if the listing did not need it); it ends with the job's ExitStack."""
        yield self.get()


def _run_listed(cfg: ShardConfig, spill: Path) -> JobResult:
    start = time.perf_counter()
    with ExitStack() as stack:
        ray = _LazyRay(cfg, stack)
        listing, claimed = _list(cfg, spill, stack, ray)
        eval_sets = list_eval_sets(cfg.exclude_near, spill, cfg.limits()) if cfg.exclude_near else []
        phases = {"list": round(time.perf_counter() - start, 3)}
        options = {**cfg.output_options(listing.kind), **near_options(eval_sets, cfg.near_distance)}
        fingerprint = hashlib.sha256(json.dumps({"options": options, "inputs": listing.fingerprint},
                                                sort_keys=True).encode()).hexdigest()
        if not claimed:
            _claim_out(cfg, stack)
        if prepare_out(cfg, fingerprint, options):
            return up_to_date(cfg, start)
        remove_stale_shard_temps(cfg.out, cfg.split)  # left by a killed run; never a complete shard
        with ray.started() as session:
            phases["ray_start"] = round(ray.seconds, 3)
            log(f"shard {cfg.split}: {listing.num_inputs} image files, {len(listing.classes)} classes; Ray ready "
                 f"in {ray.seconds:.1f} s ({session.nodes} node(s), {session.cpus} CPUs)")
            # One bar for the whole job: scan (one unit per input) then write (one per planned image); its rate
            # and ETA cover both phases. The write total is the input count until the scan says how many passed.
            bar = tqdm(total=2 * listing.num_inputs, desc=f"shard {cfg.split} [scan]", unit="img",
                       disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
            try:
                plan = load_plan(cfg.out, cfg.split)
                if plan is None or plan["fingerprint"] != fingerprint:
                    scan_start = time.perf_counter()
                    near = _eval_index(eval_sets, cfg, session.in_flight)
                    plan = plan_job(listing, cfg, fingerprint, options, session.in_flight, bar, near=near)
                    save_plan(plan, cfg.out, cfg.split)
                    phases["scan"] = round(time.perf_counter() - scan_start, 3)
                    log(f"shard {cfg.split}: scanned {listing.num_inputs} files in "
                         f"{time.perf_counter() - scan_start:.1f} s: {sum(plan['usable'])} usable")
                else:
                    bar.update(listing.num_inputs)
                    log(f"shard {cfg.split}: resuming the saved plan ({sum(plan['usable'])} images)")
                usable = sum(plan["usable"])
                if usable == 0:
                    merge_split(cfg.out, cfg.split, None, Rejects(cfg, listing, plan, []))
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
        entry, rejects = split_entry(cfg, listing, plan, receipts, options, seconds, phases)
        if eval_sets:
            entry["exclude_near"] = near_entry(eval_sets, cfg.near_distance,
                                               entry["counts"]["rejected"].get("near_duplicate", 0))
        merge_split(cfg.out, cfg.split, entry, rejects)
        storage.remove(plan_path(cfg.out, cfg.split))  # receipts stay: they make a re-run cheap
        storage.remove_tree(storage.join(state_dir(cfg.out, cfg.split), "scan"))  # only a resumed plan reads them
        storage.remove_tree(storage.join(state_dir(cfg.out, cfg.split), "inputs"))
    counts = entry["counts"]
    result = JobResult(cfg.split, entry["num_samples"], len(receipts), entry["run"]["resumed_shards"],
                       sum(counts["rejected"].values()),
                       counts["duplicates"], sum(s["bytes"] for s in entry["shards"]), seconds, phases,
                       entry["run"]["nodes"], entry["run"]["task_cpu_seconds"])
    print(summary(result, counts, cfg.out))
    return result
