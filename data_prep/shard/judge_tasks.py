"""The listing's judge -- sort, check, fingerprint and judge each order partition -- in groups of partitions run
in parallel, so a listing in parts is not left waiting on one driver core (about 70k rows/s: 12 h at 3e9 rows).

The raw spill files live in the driver's local TMPDIR, so the Ray tasks are pinned to the driver's node
(``NodeAffinitySchedulingStrategy``) and read and write them in place: no copy through OUT. Each group is a
range of consecutive partitions; it writes its partitions' ``inputs-PPP.jsonl`` and its own reject file, and
the driver appends the reject files to the listing's reject log in partition order and adds up the counts and
the fingerprint sums (a sum mod 2**256: any grouping gives the same). The result is byte for byte the
one-process judge's (``listing._judge_partitions``, which each group runs on its partitions).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from core.errors import UserError

from data_prep.sources.labels import Packed
from data_prep.sources.listing import RejectLog, _judge_partitions
from data_prep.spill import PARTITIONS, SpillWriter

GROUPS = 64  # groups of PARTITIONS // GROUPS consecutive partitions: 1/64 of the rows each


def judge_group(src, directory: str, kind: str, classes: list[str], classes_file, multi: bool, limits,
                parts: range, counts: list[int], mapping=None) -> dict:
    """Judge the raw partitions `parts` of the spill in `directory` (a task on the driver's node)."""
    directory = Path(directory)
    raw = SpillWriter(directory, "raw")
    raw.counts = list(counts)
    log_path = directory / f"rejects-judged-{parts[0]:03d}.jsonl"
    log = RejectLog(log_path)
    try:
        inputs_out, hashed, total, dropped, input_bytes = _judge_partitions(
            src, raw, kind, classes, classes_file, Packed([], [], multi), None, limits, log, directory, parts,
            mapping)
    finally:
        log.handle.close()
    return {"parts": list(parts), "counts": [inputs_out.counts[p] for p in parts], "hashed": hashed,
            "total": f"{total:064x}", "dropped": dropped, "input_bytes": input_bytes, "rejected": log.count,
            "non_image": log.non_image, "first": log.first, "log": str(log_path)}


def group_judge(run_groups):
    """A ``finish_listing`` judge that runs the groups through ``run_groups(fn, calls) -> results in order``."""

    def judge(src, raw: SpillWriter, kind, classes, classes_file, found: Packed, _sort_rows, limits,
              log: RejectLog, directory: Path, mapping=None):
        size = PARTITIONS // GROUPS
        calls = [(src, str(directory), kind, classes, classes_file, found.multi_label, limits,
                  range(start, start + size), raw.counts, mapping) for start in range(0, PARTITIONS, size)]
        counts, hashed, total, dropped, input_bytes = [0] * PARTITIONS, 0, 0, found.dropped, 0
        for result in run_groups(judge_group, calls):
            for part, count in zip(result["parts"], result["counts"]):
                counts[part] = count
            hashed += result["hashed"]
            total = (total + int(result["total"], 16)) % (1 << 256)
            dropped += result["dropped"]
            input_bytes += result["input_bytes"]
            with open(result["log"], encoding="utf-8") as handle:  # in partition order, as one process writes it
                shutil.copyfileobj(handle, log.handle)
            Path(result["log"]).unlink()
            log.count += result["rejected"]
            log.non_image += result["non_image"]
            first = tuple(result["first"]) if result["first"] else None
            if first is not None and (log.first is None or first[0] < log.first[0]):
                log.first = first
        return SimpleNamespace(counts=counts), hashed, total, dropped, input_bytes

    return judge


def run_on_driver_node(fn, calls) -> list:
    """fn(*call) for every call as Ray tasks on this (the driver's) node, results in call order. No retries: a
    group deletes its raw partitions as it judges them, so a retried group would see them gone; a lost worker
    stops the job instead (the listed parts are kept: rerun)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=1, max_retries=0)(fn).options(scheduling_strategy=here)
    refs = [remote.remote(*call) for call in calls]
    results = []
    try:
        for ref in refs:  # in order: the first group with a problem (a repeated id) is the one reported
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                raise (cause if isinstance(cause, UserError) else err) from None
    finally:
        for ref in refs[len(results):]:
            ray.cancel(ref)
    return results
