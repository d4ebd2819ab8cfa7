"""A run's checkpoint folder as files: tag names, the completion marker, which tags are complete, pruning.

Kept apart from the Checkpointer (which saves and loads through DeepSpeed) so that readers of checkpoints
(pipeline.weights, pipeline.checkpoint.trust) can find and mark tags without importing the save/load logic.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from core.files import atomic_write_json

log = logging.getLogger("pipeline.checkpoint.layout")

MARKER = "complete.json"
# In the run folder once the run trained all its steps (removed when a launch starts): what `pretrained=RUN`
# checks, so a fine-tune never silently starts from a run that is still training or died half-way.
FINISHED = "finished.json"
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


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, RecursionError):
        return None


def read_marker(tag_dir: str) -> Optional[dict]:
    return read_json(os.path.join(tag_dir, MARKER))


def write_marker(tag_dir: str, meta: dict) -> None:
    """Mark a tag folder complete (atomic: the marker is there in full or not at all)."""
    atomic_write_json(os.path.join(tag_dir, MARKER), meta, indent=None)


def clear_unmarked(tag_dir: str) -> None:
    """Rank 0, before a save of this step: remove what a killed or failed save of it left (no marker). DeepSpeed's
    save_checkpoint barriers after making the folder, so no rank writes into it before this. Left in place, an
    async save's stale `.done_rank<r>.json` would let the marker be written before that rank's new files."""
    if os.path.isdir(tag_dir) and read_marker(tag_dir) is None:
        shutil.rmtree(tag_dir, ignore_errors=True)


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
    return (complete_checkpoints(ckpt_dir) or [None])[-1]


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    found = complete_checkpoints(ckpt_dir)
    for old in found[:-keep] if keep > 0 else []:
        unmark(old.path)  # first: a kill mid-delete must not leave a marker over missing files
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


def unmark(tag_dir: str, reason: Optional[str] = None) -> None:
    """Take a checkpoint off the resume list: its marker goes (kept as complete.json.damaged with a reason)."""
    marker = os.path.join(tag_dir, MARKER)
    if reason is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
        return
    with contextlib.suppress(OSError):
        atomic_write_json(marker + ".damaged", {"reason": reason, "marker": read_marker(tag_dir)}, indent=None)
        os.remove(marker)
