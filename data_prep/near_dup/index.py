"""Find every stored 64-bit hash within Hamming distance d of a query without comparing against all of them.

Multi-index hashing (Norouzi, Punjani, Fleet: "Fast Search in Hamming Space with Multi-Index Hashing", CVPR
2012). Cut the 64 bits into m disjoint chunks. If two hashes differ in at most d bits, they cannot differ in
more than r = d // m bits in *every* chunk (that would be at least m * (r + 1) > d differences): by the
pigeonhole principle at least one chunk is within r bits. So: one table per chunk (the stored hashes' chunk
values, sorted, with where each came from); a query probes, in each chunk, every value within r bits of its
own chunk value (exact lookups by binary search), takes the union of the stored hashes found as candidates,
and keeps those whose full 64-bit distance is <= d. Nothing within d is missed (exact: no recall loss).

With m = d + 1 chunks, r = 0: one exact lookup per chunk -- the simplest form, good for small d. For larger d
those chunks are narrow (6 bits at d = 10) and a query would meet a sixth of the index as candidates; so m is
chosen to minimise probes + expected candidates, which gives chunks of about log2(N) bits as the paper
advises (N = 50,000, d = 10: 4 chunks of 16 bits, r = 2, 137 probes per chunk, a few hundred candidates).

Why not faiss's binary multi-index (IndexBinaryMultiHash): the same algorithm, but faiss has no pinned CPU
wheel in this project, and an index this size (an evaluation set: 10^4-10^6 hashes) is a few MB of numpy
arrays that Ray ships to every scan task zero-copy. Plain numpy arrays are also what the cache stores
(``.npz`` loaded with allow_pickle=False): nothing is unpickled.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from data_prep.near_dup.hashing import hamming

BITS = 64
DIRECT_BITS = 20  # chunks up to this wide get a direct start table (see NearIndex.__init__)


def chunk_bounds(chunks: int) -> list[tuple[int, int]]:
    """(shift, width) of `chunks` disjoint chunks of the 64 bits, widths as equal as possible."""
    widths = [BITS // chunks + (i < BITS % chunks) for i in range(chunks)]
    bounds, shift = [], BITS
    for width in widths:
        shift -= width
        bounds.append((shift, width))
    return bounds


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit value with at most `radius` bits set (the XOR masks of one chunk's probes)."""
    masks = [0]
    for count in range(1, radius + 1):
        masks.extend(sum(1 << b for b in bits) for bits in itertools.combinations(range(width), count))
    return np.array(masks, np.uint64)


def choose_chunks(size: int, max_distance: int) -> int:
    """The chunk count m in 1..d+1 with the lowest expected cost per query for `size` stored hashes: probes
    (2 array reads with a direct table, a binary search of about 20 steps without) plus candidates (a random
    stored hash matches a probe with probability 2**-width). Measured best, as it picks, with
    benchmarks/near_dup_quality.py's hashes: 4 chunks of 16 bits at d = 10 for 50k and for 1M stored hashes."""
    def cost(m: int) -> float:
        width, radius = BITS // m, max_distance // m
        probes = sum(math.comb(width, k) for k in range(radius + 1))
        probe_cost = 2 if width <= DIRECT_BITS else 20
        return m * probes * (probe_cost + size / 2.0 ** width) if probes <= 20_000 else math.inf
    return min(range(1, max_distance + 2), key=lambda m: (cost(m), -m))


class NearIndex:
    """Stored hashes (their row order is their identity: ties go to the lowest row) and one sorted table per
    chunk. ``max_distance`` is fixed at build time: it sets the number of chunks."""

    def __init__(self, hashes: np.ndarray, max_distance: int, chunks: int | None = None):
        if not 0 <= max_distance < 32:
            raise ValueError(f"max_distance {max_distance}: must be in 0..31")
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.max_distance = max_distance
        chunks = chunks or choose_chunks(len(self.hashes), max_distance)  # given: tests and benchmarks
        self.tables = []
        for shift, width in chunk_bounds(chunks):
            values = (self.hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(values, kind="stable")
            # Up to 2**DIRECT_BITS chunk values: where each value's run starts in the sorted table, so a probe is
            # two array reads instead of a binary search (4 bytes per value: 4 MB at 20 bits).
            starts = (np.concatenate([[0], np.cumsum(np.bincount(values.astype(np.int64), minlength=1 << width))])
                      .astype(np.int64) if width <= DIRECT_BITS else None)
            self.tables.append((shift, width, flip_masks(width, max_distance // chunks), starts, values[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def candidates_per_query(self) -> float:
        """Stored hashes a query meets on average (uniform hashes): what one query's lookup arrays hold."""
        return sum(len(masks) * len(self.hashes) / 2 ** width for _shift, width, masks, *_ in self.tables)

    def pairs(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query row, stored row, distance) with distance <= max_distance, each pair once, sorted by
        query row, then distance, then stored row."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        found_q, found_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for shift, width, masks, starts, values, order in self.tables:
            keys = (((queries >> np.uint64(shift)) & np.uint64((1 << width) - 1))[:, None] ^ masks[None, :]).ravel()
            if starts is not None:
                index = keys.astype(np.int64)
                low = starts[index]
                counts = starts[index + 1] - low
            else:
                low = np.searchsorted(values, keys, "left")
                counts = np.searchsorted(values, keys, "right") - low
            total = int(counts.sum())
            if not total:
                continue
            query_rows = np.repeat(np.arange(len(queries)).repeat(len(masks)), counts)
            starts = np.repeat(low - (np.cumsum(counts) - counts), counts)  # position -> table row
            stored_rows = order[np.arange(total) + starts]
            near = hamming(queries[query_rows], self.hashes[stored_rows]) <= self.max_distance  # most are far
            found_q.append(query_rows[near])
            found_s.append(stored_rows[near])
        q, s = np.concatenate(found_q), np.concatenate(found_s)
        d = hamming(queries[q], self.hashes[s])
        order = np.lexsort((s, d, q))
        q, s, d = q[order], s[order], d[order]
        once = np.ones(len(q), bool)  # a pair found through several chunks counts once
        once[1:] = (q[1:] != q[:-1]) | (s[1:] != s[:-1])
        return q[once], s[once], d[once]

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stored row, distance) of the closest stored hash within max_distance per query (lowest row on a
        tie), -1 and -1 where there is none."""
        q, s, d = self.pairs(queries)
        best_s = np.full(len(queries), -1, np.int64)
        best_d = np.full(len(queries), -1, np.int64)
        first = np.ones(len(q), bool)
        first[1:] = q[1:] != q[:-1]
        best_s[q[first]], best_d[q[first]] = s[first], d[first]
        return best_s, best_d
