"""Which source each sample of a weighted mixture comes from: a seeded schedule addressed by global position.

Global position: the run's samples numbered in step order. Step t holds positions t*G .. t*G + G - 1 (G the
global batch); within it, micro-step m of rank r fills t*G + (m * world + r) * micro .. + micro - 1. So every
rank knows the positions of its own micro-batches from the step it starts at, on any world size.

Schedule: positions come in blocks of B (>= 64, >= k*k for k sources). By the end of block b, source i has
been picked exactly floor(share_i * (b+1) * B) times (the largest source takes the rest); block b's picks
are those quotas' differences, in an order permuted by a generator seeded from (seed, b). Hence:
* `sources(start, n)`: the sources of positions start..start+n-1, from one or two cached blocks;
* `picks_before(p)`: how many of positions 0..p-1 each source has, in O(k + B): the fraction drawn so far
  is a pure function of the samples seen, identical whatever the world size, and resumes with them;
* every prefix of whole blocks holds each source's share to within one sample, so even a short run or a
  source of weight 0.001 draws its share (no per-block rounding that would starve it).

Each source keeps its own streams and positions (pipeline.data.stream): a source whose passes end sooner
than the others' (a small source upweighted) starts its next pass, reshuffled, on its own; the others go on.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

MIN_BLOCK = 64
_TAG_SCHEDULE = 5  # beside pipeline.data.stream's tags, so the block orders are not any other stream's draws


class MixtureSchedule:
    """Global position -> source index, for `weights` (any positive numbers) and `seed`."""

    def __init__(self, weights: Iterable[float], seed: int):
        w = np.asarray(list(weights), dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(w > 0):
            raise ValueError(f"mixture weights must be positive, got {w.tolist()}")
        w = w / w.max()  # weights of 1e308 would sum to inf
        self.shares = w / w.sum()
        self.seed = int(seed)
        self.block = max(MIN_BLOCK, len(w) * len(w))
        self._largest = int(np.argmax(self.shares))
        self._cache: dict[int, np.ndarray] = {}

    def _quota(self, n: int) -> np.ndarray:
        """Picks per source among positions 0..n-1, for n at a block end (see the module docstring)."""
        q = np.floor(self.shares * n).astype(np.int64)
        q[self._largest] = 0
        q[self._largest] = n - int(q.sum())
        return q

    def _block(self, b: int) -> np.ndarray:
        if b not in self._cache:
            counts = self._quota((b + 1) * self.block) - self._quota(b * self.block)
            order = np.repeat(np.arange(len(self.shares)), counts)
            rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, _TAG_SCHEDULE, b])
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = rng.permutation(order)
        return self._cache[b]

    def sources(self, start: int, n: int) -> np.ndarray:
        """The source index of each of positions start .. start + n - 1."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            b, i = divmod(start + done, self.block)
            take = min(n - done, self.block - i)
            out[done:done + take] = self._block(b)[i:i + take]
            done += take
        return out

    def picks_before(self, position: int) -> np.ndarray:
        """How many of positions 0 .. position - 1 each source has."""
        b, i = divmod(int(position), self.block)
        return self._quota(b * self.block) + np.bincount(self._block(b)[:i], minlength=len(self.shares))


def restart_positions(saved: Iterable[dict], num_workers: int, names: Optional[list[str]]) -> dict[int, dict]:
    """Every stream's start after a layout change (world size, workers, micro batch, seed or the sources): the
    pass after the furthest one seen (per source for a mixture, by name), so no data is replayed at once; the
    corrupt-sample count all on worker 0. `saved`: the old positions, `names`: the sources (None: no mixture)."""
    saved = list(saved)
    corrupt = sum(int(p.get("corrupt", 0)) for p in saved)
    if names is None:
        nxt = max([int(p["pass"]) for p in saved if "pass" in p] or [-1]) + 1
        return {w: {"pass": nxt, "offset": 0, "corrupt": corrupt if w == 0 else 0} for w in range(max(1, num_workers))}
    furthest = {name: max([int(p["sources"][name]["pass"]) for p in saved if name in p.get("sources", {})] or [-1])
                for name in names}
    return {w: {"corrupt": corrupt if w == 0 else 0,
                "sources": {n: {"pass": furthest[n] + 1, "offset": 0, "corrupt": corrupt if w == 0 and i == 0 else 0}
                            for i, n in enumerate(names)}}
            for w in range(max(1, num_workers))}
