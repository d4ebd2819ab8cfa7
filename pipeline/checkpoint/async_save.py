"""checkpoint.async_save: a save blocks training only while this rank's checkpointed tensors are copied off the
training state; one background thread per rank writes the files, checksums them and reports; rank 0's thread then
writes the signed `complete.json` (last) and prunes.

    saver = AsyncSaver(rank, world_size)
    saver.start(engine, ckpt_dir, step, client_state, keep, meta, ema)  # main thread, all ranks: copies, returns
    outcome = saver.wait()                                              # before the next save, rollback, exit

Why not DeepSpeed's DecoupledCheckpointEngine (`checkpoint.writer.type: decoupled`, 0.19): it hands the LIVE tensors
to a writer process without copying them (the next optimizer step changes them while they are written), its writer
is the FastCheckpointEngine, which needs the async-IO op built, and it commits at the next optimizer step, which then
waits for the whole write. Here DeepSpeed's own `engine.save_checkpoint` runs unchanged on the main thread with a
`SnapshotEngine` as its checkpoint engine: its `save` copies the state dict (to pinned host memory from a GPU; a
plain clone on CPU) and queues the `torch.save` for the background.

Completion without a collective off the main thread: each rank's writer, after its files are written and hashed,
writes `.done_rank<r>.json` (their sizes and checksums, or its error) into the tag folder; rank 0's writer waits for
every rank's, then marks the tag complete. A kill at any moment leaves the marker only over a checkpoint whose files
are all written. The main thread collects the outcome (`wait`, every rank at the same point) before the next save
(at most one in flight), a rollback, a stop and the end of the run.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from core.files import atomic_write_json
from pipeline.checkpoint.layout import MARKER, clear_unmarked, prune, tag_for, write_marker

DONE = ".done_rank{rank}.json"
POLL_S = 0.05  # rank 0's writer: how often it looks for the other ranks' done files
# Fault injection for tests and chaos runs, read here only (unset in production): "stall:4" stops rank 0's writer
# after its first file of step 4's save until the process is killed; "kill:2" SIGKILLs rank 0 right after it marked
# step 2's save complete.
FAULT_ENV = "COATNET_FAULT_ASYNC_SAVE"


def _fault(kind: str, step: int) -> bool:
    return os.environ.get(FAULT_ENV, "") == f"{kind}:{step}"


def host_copy(obj, memo: Optional[dict] = None):
    """A copy of a state dict that later training steps cannot change: tensors copied to CPU (into pinned memory
    from a GPU, asynchronously: call `torch.cuda.current_stream().synchronize()` before reading), containers rebuilt,
    other values deep-copied. A tensor met twice is copied once (tied weights stay tied)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            src = obj.detach()
            if src.device.type == "cpu":
                memo[id(obj)] = src.clone()
            else:  # torch's caching host allocator reuses the pinned blocks of the previous save
                out = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
                memo[id(obj)] = out.copy_(src, non_blocking=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict)
        out.clear()
        out.update((k, host_copy(v, memo)) for k, v in obj.items())
        return out
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v, memo) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied (a handle): DeepSpeed's states hold none we know of
        return obj


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


class SnapshotEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine whose `save` copies the state and queues the write into `writes`."""

    def __init__(self, writes: list, zipfile_serialization: bool = True):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization
        self.writes = writes

    def save(self, state_dict, path: str):
        snapshot = host_copy(state_dict)
        _synchronize()
        self.writes.append((os.path.abspath(path), lambda: torch.save(
            snapshot, path, _use_new_zipfile_serialization=self.zipfile_serialization)))


@dataclass
class Pending:
    """One save in flight on this rank."""
    step: int
    tag_dir: str
    started: float
    thread: Optional[threading.Thread] = None
    error: Optional[str] = None       # this rank's (rank 0: also another rank's, or the marker's)
    write_failure: bool = False
    bytes: Optional[int] = None       # rank 0: the checkpoint's size once marked
    seconds: Optional[float] = None   # from the start of the save until this rank's part (rank 0: the marker) is done
    writes: list = field(default_factory=list)


class AsyncSaver:
    """This rank's background checkpoint writer: at most one save in flight."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.pending: Optional[Pending] = None

    def start(self, engine, ckpt_dir: str, step: int, client_state: dict, keep: int, meta: dict, ema=None) -> str:
        """engine.save_checkpoint with the copying engine (collective; its barriers run here, on the main thread),
        this rank's EMA fragments copied likewise, then the writes handed to a background thread."""
        assert self.pending is None, "wait() for the save in flight first"
        tag = tag_for(step)
        pending = Pending(step, os.path.join(ckpt_dir, tag), time.monotonic())
        if self.rank == 0:
            clear_unmarked(pending.tag_dir)
        original = engine.checkpoint_engine
        engine.checkpoint_engine = SnapshotEngine(pending.writes, getattr(original, "zipfile_serialization", True))
        try:
            engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)  # ends with a barrier
        finally:
            engine.checkpoint_engine = original
        if ema is not None:
            path, write = ema.fragment_snapshot(pending.tag_dir)
            pending.writes.append((os.path.abspath(path), write))
        pending.thread = threading.Thread(target=self._write, args=(pending, keep, meta),
                                          name=f"checkpoint-writer-{tag}", daemon=True)
        self.pending = pending
        pending.thread.start()
        return tag

    def wait(self) -> Optional[Pending]:
        """Block until the save in flight (if any) is written and, on rank 0, marked; returns it."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.thread.join()
        return pending

    # ---- the background thread
    def _write(self, pending: Pending, keep: int, meta: dict) -> None:
        from pipeline.checkpoint.integrity import describe_files, is_write_failure

        report: dict
        try:
            for _, write in pending.writes:
                write()
                while self.rank == 0 and _fault("stall", pending.step):
                    time.sleep(1.0)
            report = {"files": describe_files(pending.tag_dir, [p for p, _ in pending.writes], self.rank)}
        except Exception as err:  # reported to the main thread, which ends the run with one line
            report = {"error": f"rank {self.rank}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                      "write_failure": is_write_failure(err)}
        pending.writes.clear()  # the copies are written: their memory goes back now
        try:
            atomic_write_json(os.path.join(pending.tag_dir, DONE.format(rank=self.rank)), report, indent=None)
        except OSError as err:
            report = {"error": f"rank {self.rank}: {err}", "write_failure": True}
        if self.rank == 0 and "error" not in report:
            try:  # the key (sign), a file's digest or pruning can fail too: reported, or the thread would die silently
                report = self._mark(pending, keep, meta)
            except Exception as err:
                report = {"error": f"rank 0: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                          "write_failure": is_write_failure(err)}
        pending.error, pending.write_failure = report.get("error"), bool(report.get("write_failure"))
        pending.seconds = time.monotonic() - pending.started

    def _mark(self, pending: Pending, keep: int, meta: dict) -> dict:
        """Rank 0: wait for every rank's done file, then the signed marker (last), pruning, and tidy up."""
        from pipeline.checkpoint.integrity import ALGORITHM, merge_files
        from pipeline.checkpoint.trust import sign

        reports = [self._await_done(pending.tag_dir, r) for r in range(self.world_size)]
        failed = [r for r in reports if "error" in r]
        if failed:
            return failed[0]
        files = merge_files(pending.tag_dir, [r["files"] for r in reports], skip=(MARKER,))
        pending.bytes = sum(f["bytes"] for f in files.values())
        seconds = round(time.monotonic() - pending.started, 3)
        try:
            write_marker(pending.tag_dir, sign({"step": pending.step, "time": time.time(), **meta, "save_s": seconds,
                                                "bytes": pending.bytes, "checksum": ALGORITHM, "files": files,
                                                "async": True}))
        except OSError as err:
            return {"error": f"rank 0: {err}", "write_failure": True}
        for done in glob.glob(os.path.join(glob.escape(pending.tag_dir), ".done_rank*.json")):
            os.remove(done)
        prune(os.path.dirname(pending.tag_dir), keep)
        if _fault("kill", pending.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    @staticmethod
    def _await_done(tag_dir: str, rank: int, sleep: Callable[[float], None] = time.sleep) -> dict:
        """A rank's done report, once it is there (a rank that died never writes one: the launcher ends this one)."""
        path = os.path.join(tag_dir, DONE.format(rank=rank))
        while True:
            try:
                with open(path) as f:
                    report = json.load(f)
                if isinstance(report, dict) and ("files" in report or "error" in report):
                    return report
                return {"error": f"rank {rank}: unreadable {path}", "write_failure": False}
            except FileNotFoundError:
                sleep(POLL_S)
            except (OSError, ValueError) as err:
                return {"error": f"rank {rank}: unreadable {path} ({err})", "write_failure": False}
