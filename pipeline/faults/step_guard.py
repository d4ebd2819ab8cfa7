"""Bad steps: a step whose loss or gradient is not finite, or whose loss spikes, is not applied.

    guard = StepGuard(max_bad_steps=5, spike_factor=10.0, fp16=False, device=device)
    loss = guard.inject(loss, step, micro=i)                    # fault-injection hook (tests, chaos)
    loss, mean, bad = guard.verdict(loss, step_losses)          # last micro-batch, before its backward
    ...engine.backward(loss); engine.step()...
    guard.note(step, mean, bad, engine.was_step_applied())      # on the device; no host sync
    while guard.readout(): ...roll back...                      # log, poll and save steps only: one sync

Why the update is skipped through DeepSpeed's own overflow path: every optimizer DeepSpeed wraps (ZeRO 1-3,
BF16_Optimizer, the fp16 optimizers) checks the global gradient norm at the accumulation boundary and, when
it is not finite, discards the gradients and returns before touching weights, optimizer states or the LR
schedule (`engine.was_step_applied()` is then False). Reading `engine.get_global_grad_norm()` after
`engine.step()` would be too late: the update has happened. So the verdict is taken before the boundary
micro-batch's backward, from the step's loss agreed over ranks (ONE all-reduce of one scalar per step, the
only collective this adds), and a bad step's last loss is multiplied by NaN: its gradients are NaN on every
rank and the optimizer skips the update. A plain torch optimizer (fp32 with ZeRO-0) has no such check: there
the gradients are dropped (`engine.zero_grad()`) so AdamW skips every parameter. A finite loss whose
gradient is not finite is caught by the same optimizer check (bf16/fp32; with fp16 a skipped step is the
loss scaler's business and is not counted).

No host synchronisation in a step (issue 10): the verdict never leaves the device. The all-reduce is a
device collective (NCCL enqueues it on the stream; the host does not wait), the spike threshold is computed
on the device from a ring of the last WINDOW applied losses, and the NaN multiplier is a `torch.where`. What
the host needs at once, whether the step was applied (for the EMA and the BatchNorm statistics), it gets
from `engine.was_step_applied()`: DeepSpeed reads its overflow flag on the host anyway, and a bad step has
NaN gradients, so it is never applied. The per-step outcomes (loss, verdict, threshold) queue on the device
and `readout()` copies them to the host in one transfer at the trainer's sync points (log steps, stop polls,
before a save, the last step), then counts, logs and decides on rollbacks as if it had seen each step as it
came: a rollback is later by at most the steps to the next sync point (bad steps are skipped meanwhile all
the same), and a checkpoint is never saved before the steps it follows were read. The plain-torch-optimizer
case (fp32 ZeRO-0, no overflow flag) still reads the verdict on the host every step.

What a bad step still does: its batches are consumed and it counts as a step (the LR schedule advances:
the LR stays `Schedule.lr_at(step)`, as for an fp16 overflow); the EMA is not updated and the BatchNorm
running statistics its forward passes changed are put back (with fp16 an overflow-skipped step is treated
the same way: not applied, so no EMA update; it is still not counted as bad). `max_bad_steps` bad steps in a
row, or one loss above `spike_factor` x the mean of the last WINDOW applied steps, ask for a rollback to the
previous complete checkpoint (pipeline.train.trainer); the batches of the bad steps after that checkpoint are then
skipped (`skip_steps`, kept in the checkpoint's client state until they are passed).
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Optional

import torch

from core.errors import UserError
from pipeline.runtime import distributed as D

log = logging.getLogger("pipeline.train")

# Fault injection for tests and chaos runs: "5,6" makes rank 0's first micro-batch loss NaN at optimizer steps
# 5 and 6 (1-based, as logged). Read here only; unset in production.
FAULT_ENV = "COATNET_FAULT_NAN_STEPS"
WINDOW = 50          # applied steps the spike test averages over
MIN_HISTORY = 10     # applied steps needed before the spike test runs


def fault_steps() -> frozenset[int]:
    raw = os.environ.get(FAULT_ENV, "").strip()
    return frozenset(int(s) for s in raw.split(",") if s.strip())


def batchnorm_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, var, batch count) of every BatchNorm layer: what a forward pass changes."""
    return [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


class StepGuard:
    """Decides per step whether it is applied; counts bad steps; asks for rollbacks; persists what to skip."""

    def __init__(self, max_bad_steps: int, spike_factor: float, fp16: bool = False, rank: int = 0,
                 device: Optional[torch.device] = None):
        self.max_bad_steps, self.spike_factor, self.fp16, self.rank = max_bad_steps, spike_factor, fp16, rank
        self.losses: deque = deque(maxlen=WINDOW)  # (step, agreed loss) of applied steps, as read out
        self.bad_total = 0
        self.streak: list[int] = []        # the current run of bad steps
        self.skip_steps: set[int] = set()  # steps whose batches are skipped (after a rollback)
        self.rollback_reason: Optional[str] = None
        self.applied = True                # whether the last step was applied (the EMA follows it)
        self.faults = fault_steps()
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.device = device or torch.device("cpu")
        # The spike test's history on the device: a ring of the last WINDOW applied losses. Which slot is next
        # and how many are filled are host integers: the host knows which steps were applied.
        self._ring = torch.zeros(WINDOW, dtype=torch.float64, device=self.device)
        self._filled = 0
        self._pending: list[tuple[int, torch.Tensor, bool]] = []  # (step, [mean, bad, threshold], applied)

    # ---- within a step
    def inject(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        if step in self.faults and self.rank == 0 and micro == 0:
            return loss * float("nan")
        return loss

    def threshold(self):
        """The spike threshold for the next step: inf (a host float) until MIN_HISTORY applied steps, then
        spike_factor x their mean, a device scalar (no sync)."""
        n = min(self._filled, WINDOW)
        if self.spike_factor <= 0 or n < MIN_HISTORY:
            return math.inf
        return self._ring.sum() * (self.spike_factor / n)  # unfilled slots hold 0

    def verdict(self, loss: torch.Tensor, step_losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
        """(the loss to back-propagate, the step's mean loss over ranks, bad) on the device, no host sync."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        mean = D.all_reduce_sum(torch.stack(step_losses).mean().double()) / world
        if self._ring.device != mean.device:  # built without `device`: follow the loss's, once
            self.device, self._ring = mean.device, self._ring.to(mean.device)
        threshold = self.threshold()
        bad = ~torch.isfinite(mean) | (mean > threshold)
        self._threshold = threshold
        return loss * torch.where(bad, float("nan"), 1.0).to(loss.dtype), mean, bad

    def snapshot_buffers(self, module: torch.nn.Module) -> None:
        """Keep the BatchNorm statistics before the step's forward passes (put back if it is bad).

        Only those: a forward changes nothing else, and the other buffers are constants (each block's int64
        relative-position index alone is 336 MiB for CoAtNet-7 at 512 px), which a copy per step would cost.
        """
        bufs = batchnorm_buffers(module)
        if len(self._buffers) != len(bufs):
            self._buffers = [(b, b.detach().clone()) for b in bufs]
        with torch.no_grad():
            for live, saved in self._buffers:
                saved.copy_(live)

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for live, saved in self._buffers:
                live.copy_(saved)

    # ---- after a step: on the device, then read at sync points
    def note(self, step: int, mean: torch.Tensor, bad: torch.Tensor, applied: bool) -> None:
        """The step's outcome, kept on the device until `readout`. `applied` is the host's (DeepSpeed's)."""
        self.applied = applied
        if applied:
            self._ring[self._filled % WINDOW] = mean  # a device copy; the index is a host int
            self._filled += 1
        threshold = self._threshold
        if not isinstance(threshold, torch.Tensor):
            threshold = torch.full((), threshold, dtype=torch.float64, device=mean.device)
        self._pending.append((step, torch.stack([mean.double(), bad.double(), threshold]), applied))

    def readout(self) -> bool:
        """Bring the queued outcomes to the host (one transfer), count and log them in step order. True when
        one asks for a rollback (`rollback_reason`); the steps after it stay queued for the next call."""
        if not self._pending:
            return False
        values = torch.stack([v for _, v, _ in self._pending]).tolist()  # the one device->host sync
        outcomes = [(step, mean, bad > 0, threshold, applied)
                    for (step, _, applied), (mean, bad, threshold) in zip(self._pending, values)]
        self._pending = []
        for i, outcome in enumerate(outcomes):
            if self.record(*outcome):
                self._pending = [(s, torch.tensor([m, float(b), t], dtype=torch.float64, device=self.device), a)
                                 for s, m, b, t, a in outcomes[i + 1:]]
                return True
        return False

    def record(self, step: int, mean_loss: float, bad: bool, threshold: float, applied: bool) -> bool:
        """Count the step's outcome; True when the run should roll back (reason in `rollback_reason`)."""
        grad_bad = not bad and not applied and not self.fp16  # finite loss, non-finite gradient
        if not (bad or grad_bad):
            self.streak = []
            if applied:
                self.losses.append((step, mean_loss))
            return False
        self.bad_total += 1
        self.streak.append(step)
        spike = bad and math.isfinite(mean_loss)
        what = (f"loss {mean_loss:.4g} > {self.spike_factor:g} x recent mean {threshold / self.spike_factor:.4g}"
                if spike else "non-finite gradient norm" if grad_bad else f"non-finite loss ({mean_loss})")
        if self.rank == 0:
            log.warning("step %d not applied: %s (bad steps: %d in a row, %d in all)", step, what, len(self.streak),
                        self.bad_total)
        if spike:
            self.rollback_reason = f"loss spike at step {step} ({what})"
        elif len(self.streak) >= self.max_bad_steps:
            self.rollback_reason = f"{len(self.streak)} bad steps in a row (steps {self.streak[0]}-{step})"
        else:
            return False
        return True

    def skip(self, step: int) -> bool:
        return step in self.skip_steps

    def skipped(self, step: int, samples: int) -> None:
        """The batches of `step` were consumed without training (a rollback asked for it)."""
        self.skip_steps.discard(step)
        self.applied = False
        if self.rank == 0:
            log.warning("step %d: skipped its batches (%d samples) after the rollback", step, samples)

    def rolled_back(self, to_step: int, samples_per_step: int) -> None:
        """After restoring the checkpoint of `to_step`: skip the bad steps after it, forget later losses (the
        queued outcomes are of steps after it: they will be trained again)."""
        bad = sorted(s for s in self.streak if s > to_step)
        self.skip_steps.update(bad)
        self.losses = deque(((s, v) for s, v in self.losses if s <= to_step), maxlen=WINDOW)
        self._pending = []
        self._ring.zero_()
        values = [v for _, v in self.losses]
        if values:
            self._ring[:len(values)] = torch.tensor(values, dtype=torch.float64)
        self._filled = len(values)
        if self.rank == 0:
            log.warning("rolled back to step %d (%s): the batches of steps %s (%d samples) will be skipped", to_step,
                        self.rollback_reason, ",".join(map(str, bad)) or "-", len(bad) * samples_per_step)
        self.streak, self.rollback_reason = [], None

    def no_checkpoint(self) -> None:
        """No checkpoint to roll back to: a spike (that step was not applied) carries on; a run of bad steps
        stops with one line (the weights are intact, but the run is not making progress)."""
        reason, self.rollback_reason = self.rollback_reason, None
        if len(self.streak) < self.max_bad_steps:
            if self.rank == 0:
                log.warning("%s, but no complete checkpoint to roll back to: continuing", reason)
            return
        raise UserError(f"{reason} and no complete checkpoint to roll back to: lower optim.lr or check the data, "
                        f"save more often (checkpoint.every_steps), then relaunch")

    # ---- client state (pipeline.train.state)
    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_total, "skip_steps": sorted(self.skip_steps)}

    def load_state_dict(self, saved: Optional[dict]) -> None:
        """Merge: a rollback keeps this run's count and pending skips, a new process takes the saved ones."""
        saved = saved or {}
        self.bad_total = max(self.bad_total, int(saved.get("bad_steps", 0)))
        self.skip_steps |= {int(s) for s in saved.get("skip_steps", [])}
