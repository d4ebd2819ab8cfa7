"""Checkpoints: DeepSpeed's own save/load, plus what makes resuming safe and automatic.

* `run_dir/checkpoints/step_00000123/` is written by `engine.save_checkpoint` (all ranks); when it has
  returned on every rank, rank 0 writes `complete.json` into it. DeepSpeed's `latest` file is written
  before that marker, so a kill in between could leave `latest` naming a half-written tag: resume ignores
  `latest` and picks the newest tag WITH the marker.
* Only the newest `keep` complete checkpoints are kept (a pruned one loses its marker before its files).
* The marker records each file's size and sha256 (pipeline.checkpoint.integrity), each rank hashing the files it
  wrote, and is signed with the user's key (pipeline.checkpoint.trust): resume refuses an unsigned marker or
  files others can write, before anything is unpickled, unless `trust`. It checks the digests newest first; a
  damaged checkpoint loses its marker (kept as `complete.json.damaged`, with the reason) in favour of the
  previous one. A failed save (disk full, quota, permission) ends the run with one line, older ones untouched.
* Each rank's EMA fragments (pipeline.train.ema) are written into the tag folder as `ema_rank<r>.safetensors` after
  DeepSpeed's files and before the marker, and are checksummed like them.
* A different world size (or ZeRO stage) cannot load ZeRO partitions saved by another layout: the newest
  checkpoint is converted once with DeepSpeed's `ds_to_universal` (its parallel extract and merge workers) into
  `checkpoints/universal/<tag>/` and loaded with the engine's `checkpoint.load_universal` option; the EMA is
  re-sliced from the source tag's fragment files. The other ranks wait for the conversion by polling its marker
  and rank 0's heartbeat file, not in a collective with a timeout.
* checkpoint.async_save (pipeline.checkpoint.async_save): `save` returns once every rank has copied its state; a
  background thread per rank writes and hashes the files, rank 0's writes the marker last. `wait()` (collective)
  collects it: before the next save, in `find_resume` (a rollback), and at a stop or the end of the run.
* A restore keeps nothing it loaded referenced (the client state's EMA entry is dropped, garbage collected).

The trainer uses one `Checkpointer`:

    checkpointer = Checkpointer(ckpt_dir, keep, info, zero_stage)
    resume = checkpointer.find_resume()          # before the engine: a universal load changes its config
    checkpointer.restore(engine, state, resume)  # state: a pipeline.train.state.TrainState
    checkpointer.save(engine, state)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from core.files import atomic_write_json
from pipeline.checkpoint.layout import (MARKER, CheckpointInfo, clear_unmarked, complete_checkpoints, latest_complete,
                                        prune, read_json, read_marker, tag_for, unmark, write_marker)

log = logging.getLogger("pipeline.checkpoint.checkpointer")

CONVERSION_ALLOWANCE = 4  # x train.hang_timeout_s: rank 0's allowance for a universal conversion, plus
CONVERSION_BYTES_PER_S = 20e6  # ... its checkpoint's bytes at this (slow) rate: read, regrouped, written again
MAX_CONVERSION_WORKERS = 8  # ds_to_universal's extract / merge processes (each extract worker: one rank's file)
HEARTBEAT_S = 10.0  # rank 0 touches <universal tag>.converting this often while converting
DEFAULT_HANG_S = 1800.0  # without a watchdog: how long a silent conversion is waited for
def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int, meta: dict,
         stats: Optional[dict] = None, ema=None) -> str:
    """engine.save_checkpoint on every rank, then each rank's EMA fragment file (`ema`: a pipeline.train.ema.ShardedEMA),
    each rank recording its files' sizes and checksums; then the completion marker holding them all, and
    pruning, on rank 0. A write that fails (disk full, quota, permission) ends the
    run with one line (checkpoint_integrity.exit_save_failed): the marker is never written, older ones stay."""
    import torch.distributed as dist

    from pipeline.runtime import distributed as D
    from pipeline.checkpoint.integrity import (ALGORITHM, describe_files, exit_save_failed, is_write_failure,
                                               merge_files, record_writes, space_message)
    from pipeline.checkpoint.trust import sign

    stats = {} if stats is None else stats
    tag, rank, start = tag_for(step), dist.get_rank(), time.monotonic()
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0:
        clear_unmarked(tag_dir)
    try:
        with record_writes(engine) as written:
            engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)  # ends with a barrier
        if ema is not None:  # before the marker: a checkpoint marked complete has every rank's fragment
            written.append(os.path.abspath(ema.save_fragments(tag_dir)))
        files = describe_files(tag_dir, written, rank)
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):
            raise
        newest = latest_complete(ckpt_dir)
        exit_save_failed(space_message(ckpt_dir, tag, f"rank {rank}: {err}".split("\n")[0], stats.get("need"),
                                       newest.tag if newest else None))
    gathered = D.all_gather_object(files)
    stats.update(bytes=sum(f["bytes"] for records in gathered for f in records.values()),
                 seconds=time.monotonic() - start)
    if rank == 0:
        files = merge_files(tag_dir, gathered, skip=(MARKER,))
        stats["bytes"] = sum(f["bytes"] for f in files.values())
        try:
            write_marker(tag_dir, sign({"step": step, "time": time.time(), **meta, "save_s": round(stats["seconds"], 3),
                                        "bytes": stats["bytes"], "checksum": ALGORITHM, "files": files}))
        except OSError as err:
            newest = latest_complete(ckpt_dir)
            exit_save_failed(space_message(ckpt_dir, tag, str(err), stats.get("need"),
                                           newest.tag if newest else None))
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def conversion_workers(files: int) -> tuple[int, int]:
    """(extract, merge) worker processes for ds_to_universal: one per CPU this process may use, at most
    MAX_CONVERSION_WORKERS (each extract worker holds one rank's optimizer file in memory), and no more extract
    workers than there are rank files."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(MAX_CONVERSION_WORKERS, cpus))
    return max(1, min(workers, files)), workers


def _universal_dir(info: CheckpointInfo) -> str:
    return os.path.join(info.dir, "universal", info.tag)


@contextlib.contextmanager
def _heartbeat(path: str, every_s: float = HEARTBEAT_S):
    """Touch `path` every `every_s` while the block runs (the ranks waiting for it see rank 0 is alive)."""
    import threading

    def touch():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))  # not through a planted link
        os.utime(path)

    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):
                touch()

    touch()
    thread = threading.Thread(target=beat, name="universal-conversion-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def to_universal(info: CheckpointInfo) -> CheckpointInfo:
    """Convert a ZeRO checkpoint into a DeepSpeed universal checkpoint (once; reused if already there), with
    DeepSpeed's parallel extract and merge workers. While it runs, `<out>.converting` is touched every
    HEARTBEAT_S; a failure leaves its reason in `<out>.failed` (the waiting ranks read both)."""
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.checkpoint.integrity import is_write_failure
    from pipeline.checkpoint.trust import mark_signed, tag_problem

    out = _universal_dir(info)
    if read_marker(out) is None or tag_problem(out, read_marker(out)):  # reused only when this user's key signed it
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        optimizer_files = len([n for n in os.listdir(info.path) if n.endswith("optim_states.pt")])
        extract, merge = conversion_workers(optimizer_files)
        args = argparse.Namespace(input_folder=info.path, output_folder=out, num_extract_workers=extract,
                                  num_merge_workers=merge, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        log.warning("converting %s (world size %d) to a universal checkpoint in %s (%d extract, %d merge workers)",
                    info.path, info.world_size, out, extract, merge)
        try:
            with _heartbeat(out + ".converting"):
                ds_to_universal.main(args)
                kept = {k: v for k, v in info.meta.items() if k not in ("files", "signature")}  # the source's
                mark_signed(out, {**kept, "universal_of": info.path})  # rank 0 hashes the conversion's files
        except BaseException as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            with contextlib.suppress(OSError):
                atomic_write_json(out + ".failed", {"reason": reason, "write_failure": is_write_failure(err)})
            raise
    return CheckpointInfo(os.path.dirname(out), info.tag, info.step, info.world_size, info.zero_stage,
                          read_marker(out) or {})


def wait_for_universal(info: CheckpointInfo, stale_after_s: float, watchdog=None, poll_s: float = 1.0) -> None:
    """On the ranks other than 0: wait until rank 0's conversion of `info` is marked complete, for as long as it
    takes, polling the marker instead of waiting in a collective with a timeout. Its heartbeat file must stay
    fresher than `stale_after_s` (else rank 0 died or hung: RuntimeError); `watchdog` is kept alive meanwhile."""
    out = _universal_dir(info)
    started = time.monotonic()
    while read_marker(out) is None:
        failed = read_json(out + ".failed")
        if failed is not None:
            raise RuntimeError(f"rank 0 could not convert {info.path} to a universal checkpoint "
                               f"({failed.get('reason')}); see its log")
        try:
            age = time.time() - os.path.getmtime(out + ".converting")
        except OSError:  # not started yet (or just finished: the marker is read again first)
            age = time.monotonic() - started
        if age > stale_after_s:
            raise RuntimeError(f"rank 0's conversion of {info.path} to a universal checkpoint shows no sign of life "
                               f"for {age:.0f} s ({out}.converting); relaunch to resume")
        if watchdog is not None:
            watchdog.beat("waiting for rank 0's universal conversion")
        time.sleep(poll_s)


def _release_loaded() -> None:
    """After a restore: what DeepSpeed and the client state loaded is garbage now; hand it back at once (the
    accelerator's cache too) instead of carrying it into the first training steps."""
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().empty_cache()


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, and whether it is a universal conversion of it."""
    checkpoint: CheckpointInfo
    universal: bool


class Checkpointer:
    """Saving, choosing and restoring a run's checkpoints in `ckpt_dir` (every rank holds one)."""

    def __init__(self, ckpt_dir: str, keep: int, info, zero_stage: int, watchdog=None, trust: bool = False,
                 async_save: bool = False):
        self.ckpt_dir, self.keep, self.info, self.zero_stage = ckpt_dir, keep, info, zero_stage
        self.saver = None  # checkpoint.async_save: a pipeline.checkpoint.async_save.AsyncSaver
        if async_save:
            from pipeline.checkpoint.async_save import AsyncSaver

            self.saver = AsyncSaver(info.rank, info.world_size)
        self.trust = trust  # checkpoint.trust: resume from checkpoints this user's key did not sign
        self.watchdog = watchdog  # pipeline.faults.watchdog.Watchdog: saves and verification get their own allowance
        self.saved_step = -1  # the step of the newest checkpoint this run holds (-1: none)
        self.last_save_s: Optional[float] = None  # how long the newest save took (SIGTERM: does one fit?)
        self.last_bytes: Optional[int] = None     # and how big it was (free space before the next one)
        self.run_config: Optional[dict] = None  # the resolved config, kept in each marker (config changes on resume)

    def find_resume(self) -> Optional[ResumePoint]:
        """The newest complete checkpoint whose files check out; rank 0 converts a changed layout; all ranks get it.

        The conversion takes as long as the model needs (CoAtNet-7: tens of minutes): rank 0 gets an allowance
        that grows with the checkpoint's size; the other ranks poll its marker and heartbeat
        (`wait_for_universal`) instead of waiting in a collective whose timeout a large model could exceed."""
        import torch.distributed as dist

        from pipeline.checkpoint.trust import tag_problem
        from pipeline.runtime import distributed as D

        self.wait()  # a rollback resumes from the save in flight too, once it is marked
        with self._watch("checkpoint verification"):
            found = self._newest_intact()
        if found is None or not self._layout_changed(found):
            return D.broadcast_object(ResumePoint(found, False) if found is not None else None)
        out = _universal_dir(found)
        if self.info.is_main:
            log.warning("checkpoint %s was written by %d ranks with ZeRO-%d; now %d ranks with ZeRO-%d: resuming "
                        "through a universal checkpoint", found.tag, found.world_size, found.zero_stage,
                        self.info.world_size, self.zero_stage)
            for stale in (out + ".failed", out + ".converting"):  # a previous launch's
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
            if read_marker(out) is not None and tag_problem(out, read_marker(out), digests=False):
                unmark(out)  # not signed by this user: the others wait for rank 0's own conversion
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # nobody reads a previous launch's .failed
        timeout = self.watchdog.timeout_s if self.watchdog else DEFAULT_HANG_S
        if self.info.is_main:
            allowance = CONVERSION_ALLOWANCE * timeout + float(found.meta.get("bytes") or 0) / CONVERSION_BYTES_PER_S
            with self._watch("universal conversion", allowance):
                resume = ResumePoint(to_universal(found), True)
        else:
            with self._watch("waiting for rank 0's universal conversion"):
                wait_for_universal(found, stale_after_s=timeout, watchdog=self.watchdog)
            resume = None
        return D.broadcast_object(resume)

    def _newest_intact(self) -> Optional[CheckpointInfo]:
        """Newest first, each rank checks its share of a complete checkpoint's recorded sizes and checksums; a
        damaged one loses its marker, with a warning naming the file, and the previous one is tried."""
        from pipeline.runtime import distributed as D
        from pipeline.checkpoint.integrity import verify_share

        candidates = D.broadcast_object(complete_checkpoints(self.ckpt_dir) if self.info.is_main else None)
        for found in reversed(candidates):
            self._require_trusted(found)
            share = verify_share(found.path, found.meta, self.info.rank, self.info.world_size)
            problems = [p for rank_problems in D.all_gather_object(share) for p in rank_problems]
            if not problems:
                return found
            if self.info.is_main:
                log.warning("checkpoint %s is damaged (%s): not resuming from it; trying the previous complete one",
                            found.path, "; ".join(problems))
                unmark(found.path, "; ".join(problems))
        return None

    def _require_trusted(self, found: CheckpointInfo) -> None:
        """Before any rank unpickles `found` (pipeline.checkpoint.trust); each rank then checks its share's digests."""
        from pipeline.checkpoint.trust import require_trusted_resume

        require_trusted_resume(found.path, found.meta, self.info.is_main, self.trust)

    def _watch(self, what: str, allowance: Optional[float] = None):
        return self.watchdog.phase(what, allowance) if self.watchdog is not None else contextlib.nullcontext()

    def _layout_changed(self, found: CheckpointInfo) -> bool:
        changed = found.world_size != self.info.world_size or found.zero_stage != self.zero_stage
        return changed and found.zero_stage >= 1

    def restore(self, engine, state, resume: ResumePoint) -> dict:
        """Load model, optimizer and schedule into `engine`, the client state and EMA into `state`; returns the client
        state (without its EMA entry: nothing loaded stays referenced after this)."""
        found = resume.checkpoint
        # The EMA fragments are beside DeepSpeed's files of the tag (a universal conversion has none: its source's).
        ema_folder = os.path.join(os.path.dirname(found.dir), found.tag) if resume.universal else found.path
        with self._watch("checkpoint load"):
            load_path, client = engine.load_checkpoint(found.dir, tag=found.tag, load_module_strict=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {found.path}")
            state.load_state_dict(client, ema_folder=ema_folder)  # drops the client state's EMA entry
        _release_loaded()
        # The LR follows THIS launch's schedule from the restored step (pipeline.train.optim.ScheduleLR), also after a
        # universal load; a plain LambdaLR keeps the restored one.
        if hasattr(engine.lr_scheduler, "restart_at"):
            engine.lr_scheduler.restart_at(state.step)
        else:
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        self.saved_step = state.step
        self.last_save_s, self.last_bytes = found.meta.get("save_s"), found.meta.get("bytes")
        if self.info.is_main:
            log.info("resumed from %s at step %d (samples seen %d)%s", found.path, state.step,
                     int(client["samples_seen"]), " via universal checkpoint" if resume.universal else "")
        return client

    def save(self, engine, state) -> str:
        """Save `engine` and `state` at `state.step` (collective), unless that step is already saved. With
        async_save, first wait for the save in flight, then return once this one's copies are taken."""
        from pipeline.runtime import distributed as D

        if self.saved_step == state.step:
            return tag_for(state.step)
        start = time.monotonic()
        self.wait()  # at most one save in flight
        stats = {"need": self.last_bytes}
        meta = {"world_size": self.info.world_size, "zero_stage": self.zero_stage, "config": self.run_config}
        with self._watch("checkpoint save"):
            self._check_space(state.step)
            D.sync_batchnorm_stats(engine.module)  # every rank's BatchNorm statistics agree in the checkpoint
            if self.saver is not None:
                tag = self.saver.start(engine, self.ckpt_dir, state.step, state.state_dict(), self.keep, meta,
                                       ema=state.ema)
            else:
                tag = save(engine, self.ckpt_dir, state.step, state.state_dict(), self.keep, meta, stats=stats,
                           ema=state.ema)
        self.saved_step = state.step
        blocked = time.monotonic() - start
        if self.saver is None:
            self.last_save_s, self.last_bytes = stats["seconds"], stats["bytes"]
        if self.info.is_main:
            log.info("%s checkpoint %s (training blocked %.3f s)", "writing" if self.saver else "saved",
                     os.path.join(self.ckpt_dir, tag), blocked)
        return tag

    def wait(self) -> None:
        """checkpoint.async_save: block until the save in flight is written and marked on every rank (collective;
        nothing when none is in flight). A failed write ends the run with one line, as a synchronous save does."""
        from pipeline.checkpoint.integrity import exit_save_failed, space_message
        from pipeline.runtime import distributed as D

        if self.saver is None or self.saver.pending is None:
            return
        start = time.monotonic()
        with self._watch("waiting for the checkpoint save in flight"):
            done = self.saver.wait()
        outcomes = D.all_gather_object((done.error, done.write_failure, done.seconds, done.bytes))
        errors = [(error, write) for error, write, _, _ in outcomes if error]
        if errors:
            if not errors[0][1]:
                raise RuntimeError(f"background save of {done.tag_dir} failed: {errors[0][0]}")
            newest = latest_complete(self.ckpt_dir)
            exit_save_failed(space_message(self.ckpt_dir, tag_for(done.step), errors[0][0], self.last_bytes,
                                           newest.tag if newest else None))
        self.last_save_s = max(seconds for _, _, seconds, _ in outcomes)  # SIGTERM: a whole save must fit
        self.last_bytes = outcomes[0][3]
        if self.info.is_main:
            log.info("saved checkpoint %s (in the background in %.3f s; waited %.3f s for it)", done.tag_dir,
                     self.last_save_s, time.monotonic() - start)

    def _check_space(self, step: int) -> None:
        """Before a save: stop with one line (every rank) when the disk cannot hold another checkpoint of the
        size of the last one, instead of filling it and failing half-way."""
        import torch

        from core.errors import UserError
        from pipeline.runtime import distributed as D
        from pipeline.checkpoint.integrity import free_bytes, space_message

        if not self.last_bytes:
            return
        free = free_bytes(self.ckpt_dir) if self.info.is_main else None
        short = free is not None and free < self.last_bytes * 1.05
        if D.all_reduce_sum(torch.tensor([float(short)], dtype=torch.float64)).item() > 0:
            newest = latest_complete(self.ckpt_dir)
            raise UserError(space_message(self.ckpt_dir, tag_for(step), "not enough free space", self.last_bytes,
                                          newest.tag if newest else None))
