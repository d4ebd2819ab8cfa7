"""The end of a shard job: every reject of the split (rejects.jsonl), the split's _info.json entry, and the
one-line summary."""
from __future__ import annotations

import time
from collections import Counter

from core import storage
from core.storage import Location

from data_prep.shard.config import JobResult, ShardConfig
from data_prep.shard.info import load_info
from data_prep.shard.layout import INFO_NAME, REJECTS_NAME, scan_receipt_path
from data_prep.shard.tasks import read_scanned
from data_prep.sources.listing import PartitionedListing
from data_prep.spill import PARTITIONS, external_sort, read_spill


class Rejects:
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


def split_entry(cfg: ShardConfig, listing: PartitionedListing, plan: dict, receipts: list[dict], options: dict,
                 seconds: float, phases: dict) -> tuple[dict, Rejects]:
    late = [r for receipt in receipts for r in receipt["rejects"]]
    rejects = Rejects(cfg, listing, plan, late)
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


def summary(result: JobResult, counts: dict, out: Location) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in counts.get("rejected", {}).items()) or "none"
    nodes = ", ".join(f"{node[:8]}:{n}" for node, n in result.nodes.items()) or "-"
    return (f"shard {result.split}: wrote {result.num_samples} images in {result.num_shards} shards "
            f"({result.resumed_shards} kept from an earlier run), rejected {result.rejected} ({rejected}), "
            f"duplicates {result.duplicates}, {result.bytes / 1e6:.2f} MB, {result.seconds:.1f} s, "
            f"{result.images_per_s:.0f} images/s; shards written per node: {nodes}; "
            f"see {storage.join(out, INFO_NAME)} and {storage.join(out, REJECTS_NAME)}")


def up_to_date(cfg: ShardConfig, start: float) -> JobResult:
    entry = load_info(cfg.out)["splits"][cfg.split]
    result = JobResult(cfg.split, entry["num_samples"], len(entry["filenames"]), len(entry["filenames"]),
                       sum(entry["counts"]["rejected"].values()), entry["counts"]["duplicates"],
                       sum(s["bytes"] for s in entry["shards"]), time.perf_counter() - start, {}, {},
                       up_to_date=True)
    print(f"shard {cfg.split}: {cfg.out} is up to date ({result.num_samples} images in {result.num_shards} "
          f"verified shards); nothing to do")
    return result
