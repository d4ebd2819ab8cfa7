"""``shard --exclude-near EVAL ...``: the evaluation sets' perceptual hashes, built once by the driver, shipped
to every scan task through Ray's object store, where a training image within ``--near-distance`` bits of an
evaluation image becomes a ``near_duplicate`` reject (never a shard sample).

An EVAL is listed like any SRC (every source kind, our own shards included, ``sources.listing``) and hashed
by Ray tasks (``hash_listing``, also used by ``data_prep dedup``). Its hashes are cached in
``OUT/_state/near_dup/<key>.npz`` (two plain arrays, loaded with allow_pickle=False), the key being the hash
kind and the EVAL's listing fingerprint: a re-run, or another split excluding the same set, hashes nothing
again, and a changed EVAL is hashed afresh.

Determinism: the index rows are the sets in command-line order, each sorted by id; a training image's match is
its nearest evaluation image (lowest row on a tie), a pure function of its bytes and of the eval sets, so
which images are rejected -- and so every other image's shard and position -- is the same on every run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import storage
from core.errors import UserError
from core.storage import Location

from data_prep.images import ImageRejected, ImageOptions
from data_prep.limits import Limits
from data_prep.near_dup.hashing import HASH_NAME, bytes_hash
from data_prep.near_dup.index import NearIndex
from data_prep.sources.listing import PartitionedListing, is_image_name, list_partitioned
from data_prep.sources.read import read_bytes
from data_prep.spill import PARTITIONS, read_spill

HASH_TASK_ROWS = 2000  # files hashed per Ray task


def _flat_folder_manifest(path, directory: Path) -> Path | None:
    """A local folder of image files without sub-folders (ImageNet-1K val as ILSVRC ships it: 50,000
    ILSVRC2012_val_*.JPEG) has no classes, which an eval set does not need: list it through a JSONL manifest
    of its files (written to the listing's temp folder), with the id of each its file name."""
    if storage.is_url(path) or not Path(path).is_dir():
        return None
    entries = list(os.scandir(path))
    if any(e.is_dir() for e in entries) or not any(is_image_name(e.name) for e in entries):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "flat-eval.jsonl"
    with open(manifest, "w", encoding="utf-8") as handle:
        for entry in sorted(entries, key=lambda e: e.name):
            handle.write(json.dumps({"path": os.path.abspath(entry.path), "label": "eval"}) + "\n")
    return manifest


def list_eval_sets(paths, spill: Path, limits: Limits) -> list[tuple[str, PartitionedListing]]:
    """(EVAL as given, its listing) per --exclude-near argument; a listing mistake names the flag."""
    sets = []
    for number, path in enumerate(paths):
        directory = Path(spill) / f"eval-{number}"
        try:
            flat = _flat_folder_manifest(path, directory)
            listing = list_partitioned(flat or path, "auto", None, 0, directory, limits=limits)
        except UserError as err:
            raise UserError(f"--exclude-near {path}: {err}") from None
        sets.append((str(path), listing))
    return sets


def near_options(sets: list[tuple[str, PartitionedListing]], max_distance: int) -> dict:
    """The job-fingerprint options of --exclude-near ({} without it, so other jobs keep their fingerprint)."""
    if not sets:
        return {}
    return {"exclude_near": [{"source": name, "fingerprint": listing.fingerprint} for name, listing in sets],
            "near_distance": max_distance, "near_hash": HASH_NAME}


def near_entry(sets: list[tuple[str, PartitionedListing]], max_distance: int, removed: int) -> dict:
    """The split's _info.json record of --exclude-near: which sets, at what distance, how many were removed."""
    return {"eval_sets": [{"source": name, "images": listing.num_inputs, "fingerprint": listing.fingerprint}
                          for name, listing in sets],
            "max_distance": max_distance, "hash": HASH_NAME, "removed": removed}


def hash_files(items: list, options: dict) -> tuple[list[str], list[int], int]:
    """(ids, hashes, files that did not decode) of [(id, path, offset, size)]: one Ray task's work."""
    opts = ImageOptions(**options)
    ids, hashes, bad = [], [], 0
    for file_id, path, offset, size in items:
        try:
            data = read_bytes(path, offset, size, opts.max_bytes, opts.max_row_group_bytes)
            hashes.append(bytes_hash(data, opts.max_pixels))
            ids.append(file_id)
        except (OSError, ImageRejected):
            bad += 1
    return ids, hashes, bad


def _listing_chunks(listing: PartitionedListing):
    chunk = []
    for part in range(PARTITIONS):
        if listing.counts[part]:
            for _key, file_id, _cls, path, offset, size, _labels in read_spill(listing.inputs_path(part)):
                chunk.append((file_id, path, offset, size))
                if len(chunk) == HASH_TASK_ROWS:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def hash_listing(listing: PartitionedListing, options: dict, in_flight: int, progress=None
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids sorted, their hashes as uint64, files that did not decode) of every input of a listing, hashed by
    Ray tasks (at most `in_flight` at once; ray must be initialised)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3)(hash_files)
    pending, ids, hashes, bad = [], [], [], 0
    chunks = _listing_chunks(listing)
    while True:
        for items in chunks:
            pending.append(remote.options(scheduling_strategy="SPREAD").remote(items, options))
            if len(pending) >= in_flight:
                break
        if not pending:
            break
        done, pending = ray.wait(pending, num_returns=1)
        got_ids, got_hashes, got_bad = ray.get(done[0])
        ids.extend(got_ids)
        hashes.extend(got_hashes)
        bad += got_bad
        if progress is not None:
            progress.update(len(got_ids) + got_bad)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return (np.array([ids[i] for i in order], dtype=np.str_),
            np.array([hashes[i] for i in order], dtype=np.uint64), bad)


def cache_path(out: Location, listing: PartitionedListing) -> Location:
    key = hashlib.sha256(f"{HASH_NAME}\n{listing.fingerprint}".encode()).hexdigest()[:32]
    return storage.join(out, "_state", "near_dup", f"{key}.npz")


def _load_cache(path: Location) -> tuple[np.ndarray, np.ndarray] | None:
    """A cached (ids, hashes), or None when absent or not what we write (then it is rebuilt)."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as saved:
            ids, hashes = saved["ids"], saved["hashes"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    ok = ids.dtype.kind == "U" and hashes.dtype == np.uint64 and ids.ndim == hashes.ndim == 1
    return (ids, hashes) if ok and len(ids) == len(hashes) else None


def _save_cache(path: Location, ids: np.ndarray, hashes: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids, hashes=hashes)
    if not storage.is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, buffer.getvalue())


@dataclass
class EvalIndex:
    """What every scan task gets (one ray.put): the index, and whose hash each of its rows is."""

    index: NearIndex
    ids: np.ndarray         # eval image id per row
    set_of: np.ndarray      # row -> number of its set in `sets`
    sets: list[str]         # the EVAL arguments
    counts: list[int]       # images hashed per set
    undecodable: list[int]  # images per set that did not decode (not in the index)

    def matches(self, hashes: list[int]) -> list[dict | None]:
        """Per hash: None, or the nearest eval image within the distance ({eval_set, eval_id, distance})."""
        rows, dist = self.index.nearest(np.array(hashes, dtype=np.uint64))
        return [None if r < 0 else {"eval_set": self.sets[self.set_of[r]], "eval_id": str(self.ids[r]),
                                    "distance": int(d)} for r, d in zip(rows.tolist(), dist.tolist())]


def build_eval_index(sets: list[tuple[str, PartitionedListing]], out: Location, options: dict, max_distance: int,
                     in_flight: int, log) -> EvalIndex:
    """Hash every eval set (or load its cache in OUT/_state/near_dup/) and index them all."""
    all_ids, all_hashes, set_of, counts, bad_counts = [], [], [], [], []
    for number, (name, listing) in enumerate(sets):
        path = cache_path(out, listing)
        cached = _load_cache(path)
        if cached is not None:
            ids, hashes = cached
            bad = listing.num_inputs - len(ids)
            log(f"--exclude-near {name}: {len(ids)} hashes from the cache {path}")
        else:
            ids, hashes, bad = hash_listing(listing, options, in_flight)
            _save_cache(path, ids, hashes)
            log(f"--exclude-near {name}: hashed {len(ids)} images ({bad} did not decode)")
        if not len(ids):
            raise UserError(f"--exclude-near {name}: none of its {listing.num_inputs} images decodes; check the path")
        all_ids.append(ids)
        all_hashes.append(hashes)
        set_of.append(np.full(len(ids), number, np.int32))
        counts.append(len(ids))
        bad_counts.append(bad)
    return EvalIndex(NearIndex(np.concatenate(all_hashes), max_distance), np.concatenate(all_ids),
                     np.concatenate(set_of), [name for name, _ in sets], counts, bad_counts)


def mark_near_duplicates(results: list[tuple], hashes: dict[int, int], near: EvalIndex) -> list[tuple]:
    """Scan results (id, reason, detail, width, height, sha1) with the usable ones whose hash (`hashes`:
    result position -> hash) is near an eval image turned into 'near_duplicate' rejects, which carry the
    match as a 7th item (it goes to rejects.jsonl)."""
    positions = sorted(hashes)
    for position, match in zip(positions, near.matches([hashes[p] for p in positions])):
        if match is not None:
            file_id, _reason, _detail, width, height, sha1 = results[position]
            detail = (f"within Hamming distance {match['distance']} of {match['eval_id']} of --exclude-near "
                      f"{match['eval_set']}")
            results[position] = (file_id, "near_duplicate", detail, width, height, sha1, match)
    return results
