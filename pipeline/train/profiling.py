"""Profiling a live run on request, and per-rank step times to find a straggler.

    touch RUN_DIR/.profile_now     # the next log step starts a torch.profiler trace of the next steps on every
                                   # rank: RUN_DIR/profile/rank<R>.*.pt.trace.json (tensorboard --logdir RUN_DIR/profile)

Why at log steps only: the ranks must agree on the step a trace starts, which takes a collective whose result
the host reads (a GPU sync); log steps synchronise anyway (tests/test_no_sync.py). The same single all_gather
carries each rank's busy time per step: its own host time in the data loader and the forward (before the
gradient reduction, where every rank waits for the slowest, so wall-clock step times are equal by
construction). On a GPU the forward's host time is its launch time: the figure then finds a rank starved by
its data pipeline or its host, not a slow GPU (the trace does). The trace uses torch.profiler's own schedule
and tensorboard_trace_handler, and on GPUs a CUDA memory snapshot (torch.cuda.memory._dump_snapshot, for
pytorch.org/memory_viz) of the same steps.
"""
from __future__ import annotations

import logging
import os
import statistics

import torch

from pipeline.runtime import distributed as D

log = logging.getLogger("pipeline.train")

PROFILE_REQUEST = ".profile_now"
PROFILE_DIR = "profile"
PROFILE_STEPS = 3  # traced steps after one warm-up step (torch.profiler.schedule)
STRAGGLER_FACTOR = 1.25  # a rank this much slower than the median ...
STRAGGLER_LOGS = 3  # ... at this many log steps in a row is named in a warning
MAX_RANKS_LOGGED = 64  # per-rank scalars up to this world size; above it only max, median and the slowest rank


class RankTimes:
    """Per-rank busy time (data + forward, host clock) between log steps, and the profiler it starts."""

    def __init__(self, run_dir: str, info: D.DistInfo):
        self.run_dir, self.info = run_dir, info
        self.request = os.path.join(run_dir, PROFILE_REQUEST)
        self.busy, self.steps, self.streaks = 0.0, 0, {}
        self.profiler, self.left, self.memory = None, 0, False

    def add(self, seconds: float) -> None:
        """Time this rank spent on its own work in a micro-step (train_step calls it)."""
        self.busy += seconds

    def after_step(self, step: int) -> None:
        """Every step, host only: count it, advance a running trace."""
        self.steps += 1
        if self.profiler is None:
            return
        self.profiler.step()
        self.left -= 1
        if self.left <= 0:
            self._finish(step)

    def at_log_step(self, step: int) -> dict:
        """A collective (every rank, at log steps): per-rank busy seconds per step as scalars, a straggler
        warning, and the start of a requested trace."""
        requested = self.info.is_main and self.profiler is None and os.path.exists(self.request)
        mine = torch.tensor([self.busy / max(1, self.steps), float(requested)], dtype=torch.float64)
        rows = _all_gather(mine).tolist()  # the host read of a log step (a sync point)
        self.busy, self.steps = 0.0, 0
        busy = [row[0] for row in rows]
        scalars = {"perf/rank_busy_s_max": max(busy), "perf/rank_busy_s_median": statistics.median(busy),
                   "perf/slowest_rank": busy.index(max(busy))}
        if len(busy) <= MAX_RANKS_LOGGED:
            scalars.update({f"perf/rank_busy_s/{r}": b for r, b in enumerate(busy)})
        for rank in stragglers(busy, self.streaks):
            if self.info.is_main:
                log.warning("rank %d is persistently slower than the others: %.3f s of data + forward per step vs "
                            "a median of %.3f s at %d log steps in a row (perf/rank_busy_s/* in metrics.jsonl); "
                            "touch %s for a trace", rank, busy[rank], statistics.median(busy), STRAGGLER_LOGS,
                            self.request)
        if any(row[1] for row in rows):
            self._start(step)
        return scalars

    def _start(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        folder = os.path.join(self.run_dir, PROFILE_DIR)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.info.device.type == "cuda" else [])
        self.profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=PROFILE_STEPS, repeat=1),
                                on_trace_ready=tensorboard_trace_handler(folder, worker_name=f"rank{self.info.rank}"))
        self.profiler.start()
        self.left = 1 + PROFILE_STEPS
        self.memory = self.info.device.type == "cuda"
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if self.info.is_main:
            log.info("profiling steps %d..%d on every rank into %s", step + 2, step + 1 + PROFILE_STEPS, folder)

    def _finish(self, step: int) -> None:
        """Stop the trace (its handler has written it at the last active step), dump the memory snapshot."""
        self.profiler.stop()
        self.profiler = None
        folder = os.path.join(self.run_dir, PROFILE_DIR)
        if self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(folder, f"memory_rank{self.info.rank}_step{step}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False
        if self.info.is_main:
            try:
                os.remove(self.request)
            except FileNotFoundError:
                pass
            log.info("profile of steps up to %d written to %s (tensorboard --logdir %s)", step, folder, folder)

    def close(self) -> None:
        """The run ends inside a trace: stop it (steps not reached are not written)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False


def stragglers(busy: list[float], streaks: dict[int, int]) -> list[int]:
    """Ranks whose busy time exceeds STRAGGLER_FACTOR x the median at STRAGGLER_LOGS log steps in a row
    (`streaks` carries the counts between calls); each is returned once, when its streak reaches the limit."""
    median = statistics.median(busy)
    out = []
    for rank, value in enumerate(busy):
        slow = len(busy) > 1 and value > STRAGGLER_FACTOR * median and value > 0
        streaks[rank] = streaks.get(rank, 0) + 1 if slow else 0
        if streaks[rank] == STRAGGLER_LOGS:
            out.append(rank)
    return out


def _all_gather(values: torch.Tensor) -> torch.Tensor:
    """(world, n): every rank's small float64 tensor, in rank order."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return values.unsqueeze(0)
    device = D._collective_device()
    parts = [torch.empty_like(values, device=device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, values.to(device))
    return torch.stack([p.cpu() for p in parts])

