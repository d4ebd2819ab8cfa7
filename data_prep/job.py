"""The shard job: check OUT, list, scan (Ray), plan, write shards (Ray), describe the result.

See data_prep/__main__.py for the design and the exactly-once argument. This module is the driver: it
never decodes an image itself, it decides what every task does and records what they did.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
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
from core.storage import Location

from .images import ImageOptions, ScanResult
from .info import drop_split, load_info, merge_split
from .layout import (INFO_NAME, REJECTS_NAME, STATE_DIR, plan_path, remove_stale_shard_temps, shard_name,
                     split_shards, state_dir)
from .plan import Plan, build_plan, load_plan, save_plan, shard_hash
from .sources import Listing, list_inputs
from .tasks import SPACE_ERRNOS, OutOfSpace, file_sha256

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
    if saved is not None and saved.fingerprint != fingerprint:
        raise UserError(f"{what} from an unfinished job with other inputs or options "
                        f"({_changed(saved.counts.get('options', {}), options)}); re-run that command to finish "
                        f"it, or pass --overwrite to replace it")
    if entry is None and saved is None and split_shards(out, split):
        raise UserError(f"{what} as {split}-*.tar files that {INFO_NAME} does not describe; pass --overwrite "
                        f"to replace them, or choose another OUT or --split")
    return entry is not None and saved is None and _verify_complete(out, entry)


def _load_plan(out: Location, split: str) -> Plan | None:
    path = plan_path(out, split)
    if not storage.is_url(path):
        return load_plan(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    return load_plan(io.BytesIO(data))  # gzip.open reads a file object as well as a path


def _save_plan(plan: Plan, out: Location, split: str) -> None:
    """Local: atomically into _state/. Object store: created only if absent (a conditional PUT): of two jobs
    that scanned the same split at once, the second stops here instead of writing beside the first."""
    path = plan_path(out, split)
    if not storage.is_url(path):
        Path(state_dir(out, split)).mkdir(parents=True, exist_ok=True)
        save_plan(plan, path)
        return
    with tempfile.TemporaryDirectory(prefix="data_prep-plan-") as tmp:
        local = Path(tmp) / "plan.json.gz"
        save_plan(plan, local)
        data = local.read_bytes()
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
    (data_prep.info). Running two jobs on one split of an object store at once is the user's call.
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


def _run_tasks(remote, calls: list[tuple], in_flight: int, on_result) -> None:
    """Submit calls keeping at most `in_flight` outstanding; hand each result to on_result(index, result)."""
    import ray

    pending, next_call = {}, 0
    while pending or next_call < len(calls):
        while next_call < len(calls) and len(pending) < in_flight:
            ref = remote.options(scheduling_strategy="SPREAD").remote(*calls[next_call])
            pending[ref] = next_call
            next_call += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise _unwrap_task_error(err) from None
            on_result(index, result)


def _run_with_bar(fn, calls: list[tuple], in_flight: int, on_result, bar: tqdm) -> None:
    """`fn` as Ray tasks (one CPU each, retried if a worker dies) while `bar` shows progress; bar closed after."""
    import ray

    try:
        _run_tasks(ray.remote(num_cpus=1, max_retries=3)(fn), calls, in_flight, on_result)
    finally:
        bar.close()


def _scan(listing: Listing, cfg: ShardConfig, in_flight: int) -> dict[str, ScanResult]:
    from .tasks import scan_chunk

    items = [(i.id, i.path, i.offset, i.size) for i in listing.inputs]
    chunk = max(16, min(1000, math.ceil(len(items) / (4 * in_flight))))
    calls = [(items[i:i + chunk], cfg.max_pixels) for i in range(0, len(items), chunk)]
    results: dict[str, ScanResult] = {}
    bar = tqdm(total=len(items), desc=f"scan {cfg.split}", unit="file", disable=not cfg.progress, leave=False)

    def collect(_index, rows):
        for file_id, reason, detail, width, height, sha1 in rows:
            results[file_id] = ScanResult(reason, detail, width, height, sha1)
        bar.update(len(rows))

    _run_with_bar(scan_chunk, calls, in_flight, collect, bar)
    return results


def _write(plan: Plan, cfg: ShardConfig, in_flight: int) -> list[dict]:
    from .tasks import write_shard

    options = asdict(cfg.image_options())
    calls = [(str(cfg.out), cfg.split, shard_name(cfg.split, i), shard_hash(entries),
              [e.to_list() for e in entries], options) for i, entries in enumerate(plan.shards)]
    receipts: list[dict | None] = [None] * len(calls)
    bar = tqdm(total=plan.num_samples, desc=f"shard {cfg.split}", unit="img", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)
    resumed = 0

    def collect(index, receipt):
        nonlocal resumed
        receipts[index] = receipt
        resumed += bool(receipt.get("resumed"))
        bar.update(len(plan.shards[index]))
        bar.set_postfix(shards=f"{sum(r is not None for r in receipts)}/{len(calls)}", resumed=resumed,
                        refresh=False)

    try:
        _run_with_bar(write_shard, calls, in_flight, collect, bar)
    except OutOfSpace as err:
        raise UserError(_space_message(cfg.out, str(err), plan, receipts)) from None
    return receipts  # type: ignore[return-value]


def _space_message(out: Location, cause: str, plan: Plan, receipts: list) -> str:
    """One line: OUT is full, about how much more the shards not yet written need, and that a re-run resumes."""
    done = [i for i, r in enumerate(receipts) if r is not None]
    left = [i for i, r in enumerate(receipts) if r is None]
    samples_done = sum(len(plan.shards[i]) for i in done)
    if samples_done and sum(receipts[i]["bytes"] for i in done):
        per_sample = sum(receipts[i]["bytes"] for i in done) / samples_done
        need = per_sample * sum(len(plan.shards[i]) for i in left)
    else:  # nothing written yet: the inputs' size (re-encoded images are usually smaller)
        need = sum(max(e.size, 0) for i in left for e in plan.shards[i])
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


def _label_counts(plan: Plan, late_ids: set[str]) -> tuple[Counter, dict]:
    """Images per class (an image counts once for each of its labels) and labels per image, of written samples."""
    written = [e for shard in plan.shards for e in shard if e.id not in late_ids]
    names = [e.label_names if e.labels is not None else [e.class_name] for e in written]
    per_class = Counter(n for image in names for n in image)
    sizes = [len(image) for image in names]
    return per_class, {"mean": round(sum(sizes) / len(sizes), 4) if sizes else 0.0, "max": max(sizes, default=0)}


def _split_entry(cfg: ShardConfig, listing: Listing, plan: Plan, receipts: list[dict], options: dict,
                 seconds: float, phases: dict) -> tuple[dict, list[dict]]:
    late = [r for receipt in receipts for r in receipt["rejects"]]
    rejects = sorted(plan.rejects + late, key=lambda r: r["source"])
    per_class, per_image = _label_counts(plan, {r["source"] for r in late})
    counts = {key: value for key, value in plan.counts.items() if key != "options"}
    counts.update(
        written=sum(r["num_samples"] for r in receipts),
        rejected=dict(sorted(Counter(r["reason"] for r in rejects).items())),
        per_class={name: per_class.get(name, 0) for name in plan.classes},
    )
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
        "classes": plan.classes,
        "multi_label": plan.multi_label,
        "labels_per_image": per_image,
        "options": options,
        "fingerprint": plan.fingerprint,
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
    start = time.perf_counter()
    _check_paths(cfg)
    with storage.user_errors(cfg.src, "list it as SRC"):
        listing = list_inputs(cfg.src, cfg.source, cfg.classes_file, cfg.images,
                              label_field=cfg.label_field, label_map=cfg.label_map)
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
        from .cluster import ray_session

        ray_start = time.perf_counter()
        with ray_session(cfg.ray_address, cfg.workers) as session:
            phases["ray_start"] = round(time.perf_counter() - ray_start, 3)
            _log(f"shard {cfg.split}: {len(listing.inputs)} image files, {len(listing.classes)} classes; Ray ready "
                 f"in {time.perf_counter() - ray_start:.1f} s ({session.nodes} node(s), {session.cpus} CPUs)")
            plan = _load_plan(cfg.out, cfg.split)
            if plan is None or plan.fingerprint != fingerprint:
                scan_start = time.perf_counter()
                scans = _scan(listing, cfg, session.in_flight)
                plan = build_plan(listing, scans, fingerprint, cfg.shard_size, cfg.seed, cfg.dedup)
                phases["scan"] = round(time.perf_counter() - scan_start, 3)
                _log(f"shard {cfg.split}: scanned {len(scans)} files in {time.perf_counter() - scan_start:.1f} s: "
                     f"{plan.num_samples} usable in {len(plan.shards)} shards, {len(plan.rejects)} rejected")
                plan.counts["options"] = options
                _save_plan(plan, cfg.out, cfg.split)
            else:
                _log(f"shard {cfg.split}: resuming the saved plan ({len(plan.shards)} shards)")
            if plan.num_samples == 0:
                merge_split(cfg.out, cfg.split, None, plan.rejects)
                raise UserError(f"SRC {cfg.src}: none of the {len(listing.inputs)} image files is usable; "
                                f"see {storage.join(cfg.out, REJECTS_NAME)}")
            write_start = time.perf_counter()
            receipts = _write(plan, cfg, session.in_flight)
            phases["write"] = round(time.perf_counter() - write_start, 3)
        remove_stale_shard_temps(cfg.out, cfg.split)  # temp files of workers killed mid-shard (retried)
        seconds = time.perf_counter() - start
        entry, rejects = _split_entry(cfg, listing, plan, receipts, options, seconds, phases)
        merge_split(cfg.out, cfg.split, entry, rejects)
        storage.remove(plan_path(cfg.out, cfg.split))  # receipts stay: they make a re-run cheap
    counts = entry["counts"]
    result = JobResult(cfg.split, entry["num_samples"], len(receipts), entry["run"]["resumed_shards"], len(rejects),
                       counts["duplicates"], sum(s["bytes"] for s in entry["shards"]), seconds, phases,
                       entry["run"]["nodes"], entry["run"]["task_cpu_seconds"])
    print(_summary(result, counts, cfg.out))
    return result
