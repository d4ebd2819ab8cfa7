"""Samples the training loader skips: each counted and warned about where it is read, and the run stopped in one
line when they are most of what it reads (data.max_corrupt_fraction)."""
from __future__ import annotations

import logging

from core.errors import UserError

log = logging.getLogger("pipeline.data.loader")

_MIN_CORRUPT = 16  # data.max_corrupt_fraction is judged from this many skipped samples on (not on the first one)


class CorruptionCounter:
    """A webdataset handler: warn about the error, count it, continue (never fatal)."""

    def __init__(self, label: str):
        self.label = label
        self.count = 0
        self.silent = False  # while replaying already-counted samples on resume

    def __call__(self, exn: Exception) -> bool:
        if not self.silent:
            self.count += 1
            args = [a for a in getattr(exn, "args", ()) if isinstance(a, str)]
            log.warning("skipped corrupt data (%s) in %s: %s: %s", self.count, self.label, type(exn).__name__,
                        "; ".join(args)[:300] or exn)
        return True


def check_corrupt_fraction(corrupt: int, seen: int, fraction: float) -> None:
    """Stop (one line) once more than data.max_corrupt_fraction of the samples read were skipped: a run on mostly
    broken data would train on what little is left without anyone noticing. Multi-rank runs call this with the
    sum over ranks (pipeline.train.trainer's log step), so every rank stops together, none waits in a collective."""
    if corrupt >= _MIN_CORRUPT and corrupt > fraction * seen:
        raise UserError(f"{corrupt} of the {seen} samples read so far were skipped as corrupt or over the limits "
                        f"({corrupt / seen:.0%} > data.max_corrupt_fraction {fraction}); check the shards with "
                        f"`python -m data_prep verify` (the warnings above name them)")
