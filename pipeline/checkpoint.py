"""Checkpoints: DeepSpeed's own save/load, plus what makes resuming safe and automatic.

* `run_dir/checkpoints/step_00000123/` is written by `engine.save_checkpoint` (all ranks); when it has
  returned on every rank, rank 0 writes `complete.json` into it. DeepSpeed's `latest` file is written
  before that marker, so a kill in between could leave `latest` naming a half-written tag: resume ignores
  `latest` and picks the newest tag WITH the marker.
* Only the newest `keep` complete checkpoints are kept.
* A different world size (or ZeRO stage) cannot load ZeRO partitions saved by another layout: the newest
  checkpoint is converted once with DeepSpeed's `ds_to_universal` into `checkpoints/universal/<tag>/` and
  loaded with the engine's `checkpoint.load_universal` option.

The trainer uses one `Checkpointer`:

    checkpointer = Checkpointer(ckpt_dir, keep, info, zero_stage)
    resume = checkpointer.find_resume()          # before the engine: a universal load changes its config
    checkpointer.restore(engine, state, resume)  # state: a pipeline.train_state.TrainState
    checkpointer.save(engine, state)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from core.files import atomic_write_json

log = logging.getLogger("pipeline.checkpoint")

MARKER = "complete.json"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointInfo:
    dir: str          # the folder holding the tag folders (what engine.load_checkpoint takes)
    tag: str
    step: int
    world_size: int
    zero_stage: int
    meta: dict

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.tag)


def read_marker(tag_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(tag_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(tag_dir: str, meta: dict) -> None:
    """Mark a tag folder complete (atomic: the marker is there in full or not at all)."""
    atomic_write_json(os.path.join(tag_dir, MARKER), meta, indent=None)


def complete_checkpoints(ckpt_dir: str) -> list[CheckpointInfo]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    out = []
    if not os.path.isdir(ckpt_dir):
        return out
    for name in os.listdir(ckpt_dir):
        m = _TAG_RE.match(name)
        if not m:
            continue
        meta = read_marker(os.path.join(ckpt_dir, name))
        if meta is None:
            continue
        out.append(CheckpointInfo(ckpt_dir, name, int(meta.get("step", m.group(1))), int(meta.get("world_size", 0)),
                                  int(meta.get("zero_stage", -1)), meta))
    return sorted(out, key=lambda c: c.step)


def latest_complete(ckpt_dir: str) -> Optional[CheckpointInfo]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    found = complete_checkpoints(ckpt_dir)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)
        shutil.rmtree(os.path.join(ckpt_dir, "universal", old.tag), ignore_errors=True)
    if found:
        newest = found[-1].step
        for name in os.listdir(ckpt_dir):
            m = _TAG_RE.match(name)
            path = os.path.join(ckpt_dir, name)
            if m and int(m.group(1)) < newest and read_marker(path) is None:
                log.warning("removing incomplete checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int, meta: dict) -> str:
    """engine.save_checkpoint on every rank, then the completion marker and pruning on rank 0."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)  # ends with a barrier
    if dist.get_rank() == 0:
        write_marker(os.path.join(ckpt_dir, tag), {"step": step, "time": time.time(), **meta})
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def to_universal(info: CheckpointInfo) -> CheckpointInfo:
    """Convert a ZeRO checkpoint into a DeepSpeed universal checkpoint (once; reused if already there)."""
    from deepspeed.checkpoint import ds_to_universal

    out_root = os.path.join(info.dir, "universal")
    out = os.path.join(out_root, info.tag)
    if read_marker(out) is None:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out_root, exist_ok=True)
        args = argparse.Namespace(input_folder=info.path, output_folder=out, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        log.warning("converting %s (world size %d) to a universal checkpoint in %s", info.path, info.world_size, out)
        ds_to_universal.main(args)
        write_marker(out, {**info.meta, "universal_of": info.path})
    return CheckpointInfo(out_root, info.tag, info.step, info.world_size, info.zero_stage, read_marker(out) or {})


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, and whether it is a universal conversion of it."""
    checkpoint: CheckpointInfo
    universal: bool


class Checkpointer:
    """Saving, choosing and restoring a run's checkpoints in `ckpt_dir` (every rank holds one)."""

    def __init__(self, ckpt_dir: str, keep: int, info, zero_stage: int):
        self.ckpt_dir, self.keep, self.info, self.zero_stage = ckpt_dir, keep, info, zero_stage
        self.saved_step = -1  # the step of the newest checkpoint this run holds (-1: none)

    def find_resume(self) -> Optional[ResumePoint]:
        """The newest complete checkpoint: rank 0 decides (and converts a changed layout), all ranks get it."""
        from pipeline import distributed as D

        resume = None
        if self.info.is_main:
            found = latest_complete(self.ckpt_dir)
            resume = ResumePoint(found, False) if found is not None else None
            if found is not None and self._layout_changed(found):
                log.warning("checkpoint %s was written by %d ranks with ZeRO-%d; now %d ranks with ZeRO-%d: resuming "
                            "through a universal checkpoint", found.tag, found.world_size, found.zero_stage,
                            self.info.world_size, self.zero_stage)
                resume = ResumePoint(to_universal(found), True)
        return D.broadcast_object(resume)

    def _layout_changed(self, found: CheckpointInfo) -> bool:
        changed = found.world_size != self.info.world_size or found.zero_stage != self.zero_stage
        return changed and found.zero_stage >= 1

    def restore(self, engine, state, resume: ResumePoint) -> dict:
        """Load model, optimizer and schedule into `engine` and the client state into `state`; returns it."""
        found = resume.checkpoint
        load_path, client = engine.load_checkpoint(found.dir, tag=found.tag, load_module_strict=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {found.path}")
        state.load_state_dict(client)
        # The optimizer's LR must match the (restored) schedule, also after a universal load.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        self.saved_step = state.step
        if self.info.is_main:
            log.info("resumed from %s at step %d (samples seen %d)%s", found.path, state.step,
                     int(client["samples_seen"]), " via universal checkpoint" if resume.universal else "")
        return client

    def save(self, engine, state) -> str:
        """Save `engine` and `state` at `state.step` (collective), unless that step is already saved."""
        from pipeline import distributed as D

        if self.saved_step == state.step:
            return tag_for(state.step)
        D.sync_batchnorm_stats(engine.module)  # every rank's BatchNorm statistics agree in the checkpoint
        tag = save(engine, self.ckpt_dir, state.step, state.state_dict(), self.keep,
                   {"world_size": self.info.world_size, "zero_stage": self.zero_stage})
        self.saved_step = state.step
        if self.info.is_main:
            log.info("saved checkpoint %s", os.path.join(self.ckpt_dir, tag))
        return tag
