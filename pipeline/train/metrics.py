"""Rank-0 logging: TensorBoard scalars, run_dir/metrics.jsonl and a console line with ETA.

On resume from step k the records after k (written before the kill) are dropped from metrics.jsonl and
TensorBoard is opened with purge_step=k+1, so both read as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from contextlib import contextmanager
from typing import Optional

import torch

from core.files import atomic_write_text
from pipeline.train.flops import device_peak_tflops, tflops_per_device, train_flops_per_image, utilization

log = logging.getLogger("pipeline.train")


def memory_gb(device: torch.device) -> dict:
    """Peak accelerator memory on GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return {"mem/allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLogger:
    """No-op on ranks other than 0."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_step > 0 and os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the kill
            atomic_write_text(self.path, "".join(kept))
        elif resume_step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)
        self._file = open(self.path, "a")

    def log(self, step: int, scalars: dict, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()
        if console:
            log.info(console)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._file.close()


class Throughput:
    """Images/s, TFLOP/s, MFU, HFU and ETA over the last logging window (FLOPs as pipeline.train.flops counts them).

    The window counts training steps only: time spent inside `paused()` (evaluation, checkpoint saves, the
    guard's readout and rollbacks) is left out of images/s and MFU, so MFU measures the training step and
    does not fall every time a save or an evaluation lands in the window. The ETA counts all of it (that is
    what the remaining run will take). On a GPU, entering and leaving a pause waits for the device, so
    queued training work is timed as training and an evaluation's queued work not; the trainer pauses only
    at its sync points, where the host waits anyway.
    """

    def __init__(self, global_batch: int, macs_per_image: Optional[int], device: torch.device,
                 recompute: bool = False, clock=time.perf_counter):
        self.global_batch, self.device, self.clock = global_batch, device, clock
        self.flops = train_flops_per_image(macs_per_image, recompute) if macs_per_image else None
        self.peak = device_peak_tflops(device)
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.t0 = self.clock()
        self.start = self.t0
        self.steps = 0
        self.excluded = 0.0  # seconds paused since t0

    @contextmanager
    def paused(self):
        """Leave the time of the block out of the training window."""
        self._sync()
        began = self.clock()
        try:
            yield
        finally:
            self._sync()
            self.excluded += self.clock() - began

    def restart(self, steps_done: int) -> None:
        """A new window from now at `steps_done` (after a rollback moved the step back)."""
        self.t0, self.steps, self.excluded = self.clock(), steps_done, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def window(self, steps_done: int, total_steps: int, start_step: int) -> dict:
        now = self.clock()
        dt = max(1e-9, now - self.t0 - self.excluded)
        n = steps_done - self.steps
        self.t0, self.steps, self.excluded = now, steps_done, 0.0
        ips = n * self.global_batch / dt
        out = {"perf/images_per_s": ips, "perf/step_time_s": dt / max(1, n)}
        if self.flops:
            out["perf/tflops_per_device"] = tflops_per_device(ips, self.flops.model, self.world)
            if self.peak:
                out["perf/mfu"] = utilization(ips, self.flops.model, self.world, self.peak)
                out["perf/hfu"] = utilization(ips, self.flops.hardware, self.world, self.peak)
        done = steps_done - start_step
        elapsed = now - self.start
        out["eta_s"] = elapsed / max(1, done) * (total_steps - steps_done)
        return out


def console_line(step: int, total: int, epoch: float, s: dict) -> str:
    parts = [f"step {step}/{total}", f"epoch {epoch:.2f}", f"loss {s['loss']:.4f}", f"lr {s['lr']:.3e}"]
    if s.get("grad_norm") is not None:
        parts.append(f"gnorm {s['grad_norm']:.3f}")
    parts.append(f"{s['perf/images_per_s']:.1f} img/s")
    if "perf/mfu" in s:
        parts.append(f"MFU {100 * s['perf/mfu']:.1f}%")
        if s.get("perf/hfu", s["perf/mfu"]) != s["perf/mfu"]:  # activation checkpointing recomputes
            parts.append(f"HFU {100 * s['perf/hfu']:.1f}%")
    parts.append(f"ETA {_fmt_time(s['eta_s'])}")
    return " | ".join(parts)
