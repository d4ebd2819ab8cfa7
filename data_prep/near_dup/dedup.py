"""``python -m data_prep dedup SRC``: report the groups of near-duplicate images inside one source, without
writing shards -- to see how much of a source is repeated (and at which distance) before sharding it, or
to choose ``--near-distance``.

SRC is listed like a shard job's (every source kind), every image hashed by Ray tasks
(``exclude.hash_listing``), then every image is looked up in an index of all of them (``index.NearIndex``)
and the pairs within the distance are joined into groups (union-find: a chain a~b~c is one group even when
a and c are further apart). One JSON line per group, ids sorted, with each member's distance to the group's
first id.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.files import owned_temp_dir

from data_prep.images import ImageOptions
from data_prep.limits import Limits
from data_prep.near_dup.exclude import hash_listing
from data_prep.near_dup.hashing import hamming
from data_prep.near_dup.index import NearIndex
from data_prep.sources.listing import list_partitioned

QUERY_BATCH = 65_536  # hashes looked up at once, at most
CANDIDATES = 1 << 24  # candidates per batch, at most: a query meets more of a larger index (1.28M hashes: ~10k each)


def duplicate_groups(hashes: np.ndarray, max_distance: int) -> list[list[int]]:
    """Rows of `hashes` joined into groups of two or more, each within max_distance of another member;
    groups and their members in row order."""
    index = NearIndex(hashes, max_distance)
    parent = list(range(len(hashes)))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    batch = max(1, min(QUERY_BATCH, int(CANDIDATES / max(1.0, index.candidates_per_query()))))
    for start in range(0, len(hashes), batch):
        queries, stored, _dist = index.pairs(hashes[start:start + batch])
        for query, other in zip((queries + start).tolist(), stored.tolist()):
            a, b = root(query), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the lowest row is the root: groups come out in row order
    members: dict[int, list[int]] = {}
    for row in range(len(hashes)):
        members.setdefault(root(row), []).append(row)
    return [rows for _root, rows in sorted(members.items()) if len(rows) > 1]


def run_dedup(src, source: str, max_distance: int, out: Path | None, ray_address: str | None,
              workers: int | None, options: ImageOptions, limits: Limits, label_field: str | None = None,
              log=print) -> dict:
    """List, hash and group SRC; write the groups as JSON lines to `out` (stdout when None); return counts."""
    from data_prep.shard.cluster import ray_session

    try:  # opened first: an unwritable --out is said before hours of hashing, not after
        handle = sys.stdout if out is None else open(out, "w", encoding="utf-8")
    except OSError as err:
        raise UserError(f"--out {out}: cannot write it ({err.strerror or err}); give a writable file") from None
    try:
        with owned_temp_dir("data_prep-neardup-") as spill:
            listing = list_partitioned(src, source, None, 0, spill, label_field=label_field, limits=limits)
            with ray_session(ray_address, workers) as session:
                ids, hashes, undecodable = hash_listing(listing, asdict(options), session.in_flight)
        groups = duplicate_groups(hashes, max_distance)
        for number, rows in enumerate(groups):
            first = hashes[rows[0]]
            record = {"group": number, "size": len(rows), "ids": [str(ids[r]) for r in rows],
                      "distances": hamming(hashes[rows], first).tolist()}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            handle.close()
    counts = {"images": len(ids), "undecodable": undecodable, "groups": len(groups),
              "in_groups": sum(len(g) for g in groups), "max_distance": max_distance}
    log(f"dedup: {counts['images']} images hashed ({undecodable} did not decode, {listing.rejected} rejected when "
        f"listed); {counts['groups']} groups of near duplicates within {max_distance} bits hold "
        f"{counts['in_groups']} images ({counts['in_groups'] - counts['groups']} beyond the first of each)")
    return counts
