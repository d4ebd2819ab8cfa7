"""DeepSpeed's CPU all-reduce buffers in /dev/shm, removed when a run ends.

DeepSpeed's CPU accelerator (gloo ranks on one machine) creates one POSIX shared-memory segment per local
rank, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (67 MB in DeepSpeed
0.19), and never unlinks it: its `shared_close` is not called anywhere (csrc/cpu/comm/shm.cpp). Every CPU
run leaves 67 MB per rank in a RAM-backed tmpfs; the test suite's ~100 two-rank runs filled 17 GB of a
24 GB machine. Unlinking after the process group is gone is safe: every rank mapped its peers' segments
when the group started, and a mapping outlives its name.
"""
from __future__ import annotations

import glob
import os
import re

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, addr: str | None = None, port: str | None = None) -> str:
    addr = addr if addr is not None else os.environ.get("MASTER_ADDR", "")
    port = port if port is not None else os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_own_buffer() -> None:
    """Unlink this process's segment (its LOCAL_RANK's), if DeepSpeed made one."""
    rank = os.environ.get("LOCAL_RANK")
    if rank is None or not os.path.isdir(SHM_DIR):
        return
    try:
        os.unlink(buffer_path(int(rank)))
    except (FileNotFoundError, ValueError, PermissionError):
        pass


def _mapped_paths() -> set[str]:
    """Every /dev/shm path some live process has mapped (the segments still in use)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as handle:
                mapped.update(re.findall(r"(/dev/shm/\S+)", handle.read()))
        except OSError:  # the process ended while we looked, or is not ours
            continue
    return mapped


def remove_orphans() -> int:
    """Unlink this user's segments that no live process maps (left by killed ranks); return how many."""
    mine = glob.glob(os.path.join(SHM_DIR, f"{PREFIX}_{os.getuid()}_*"))
    if not mine:
        return 0
    in_use = _mapped_paths()
    removed = 0
    for path in mine:
        if path not in in_use:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed
