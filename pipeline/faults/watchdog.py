"""A rank that stops making progress ends itself, so the launcher ends the job and a restart resumes it.

A hung collective (a peer frozen, dead or unreachable), a save or an evaluation that never returns would
otherwise keep every rank of the job waiting until someone notices. Each rank runs one `Watchdog`:

    watchdog = Watchdog(run_dir, rank, timeout_s=cfg.train.hang_timeout_s, grace_s=cfg.train.sigterm_grace_s)
    watchdog.beat()                              # each training step: `timeout_s` from now
    with watchdog.phase("checkpoint save"):      # a save, an evaluation: a fresh allowance, then back to steps
        ...

When a deadline passes, a thread writes every Python thread's stack to `run_dir/hang/rank<R>.txt` and the
process leaves with `os._exit(EXIT_HANG)`: no clean-up that could itself wait on the dead peer. A rank frozen
from outside (SIGSTOP) cannot do that, but its peers wait for it in a collective and their watchdogs fire.
If the GIL itself is stuck (a C call that never returns while holding it), faulthandler's C-level timer dumps
the stacks to stderr and exits BACKSTOP_S later.

The same thread ends a rank whose launcher died (its parent changed: torchrun starts ranks in their own
sessions, so a SIGKILLed torchrun would leave them training), and keeps the SIGTERM deadline: the handler
records the signal and the rank has `grace_s` to finish (pipeline.train.trainer decides whether a save fits),
even while the main thread waits in a collective that Python signal handlers cannot interrupt (the C-level
wakeup fd still tells this thread at once).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional

log = logging.getLogger("pipeline.faults.watchdog")

EXIT_HANG = 124        # like timeout(1): no progress within train.hang_timeout_s
EXIT_ORPHANED = 125    # the launcher that started this rank is gone
EXIT_TERMINATED = 143  # 128 + SIGTERM: saved (or not) and stopped on SIGTERM
BACKSTOP_S = 60.0      # faulthandler's own timer, for a hang that holds the GIL
POLL_S = 0.5


class Watchdog:
    """Deadline, orphan and SIGTERM guard of one rank (a daemon thread; `close` restores everything)."""

    def __init__(self, run_dir: str, rank: int, timeout_s: float, grace_s: float = 25.0,
                 orphan_check: bool = False, handle_sigterm: bool = True):
        self.path = os.path.join(run_dir, "hang", f"rank{rank}.txt")
        self.rank, self.timeout_s, self.grace_s = rank, float(timeout_s), float(grace_s)
        self.what, self.step = "start-up", None
        self._deadline = time.monotonic() + self.timeout_s
        self._term_deadline = float("inf")
        self.signal_time: Optional[float] = None  # monotonic time of the first SIGTERM
        self._ppid = os.getppid() if orphan_check else None
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._armed = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._old_handler = self._old_wakeup = None
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            os.register_at_fork(after_in_child=_reset_in_child)
            # forkserver workers (data.worker_start, the GPU default) never pass through that hook
            import multiprocessing
            multiprocessing.set_forkserver_preload(["__main__", "pipeline.faults.forkserver_shield"])  # + default
        self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)
        self._thread.start()

    # ---- the main thread's side
    def beat(self, what: str = "training step", allowance: Optional[float] = None, step: Optional[int] = None) -> None:
        """Progress: the next deadline is `allowance` (default timeout_s) from now."""
        self.what = what
        if step is not None:
            self.step = step
        self._deadline = time.monotonic() + (self.timeout_s if allowance is None else allowance)

    @contextmanager
    def phase(self, what: str, allowance: Optional[float] = None):
        """A save or an evaluation gets its own allowance; the step deadline starts again after it."""
        previous = self.what
        self.beat(what, allowance)
        yield
        self.beat(previous)

    @property
    def signalled(self) -> bool:
        return self.signal_time is not None

    def grace_left(self) -> float:
        """Seconds until the SIGTERM deadline (inf without a SIGTERM)."""
        return self._term_deadline - time.monotonic()

    def close(self) -> None:
        """Stop the thread and give SIGTERM back its previous handler (the run ended normally)."""
        self._stop.set()
        self._thread.join(timeout=5)
        faulthandler.cancel_dump_traceback_later()
        if self._old_handler is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            signal.signal(signal.SIGTERM, self._old_handler)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- signal handler (main thread, when Python gets to run it) and the watchdog thread
    def _on_signal(self, signum, frame) -> None:
        self._note_sigterm()

    def _note_sigterm(self) -> None:
        if self.signal_time is None:
            now = time.monotonic()
            self.signal_time, self._term_deadline = now, now + self.grace_s
            print(f"rank {self.rank}: SIGTERM: stopping within {self.grace_s:g} s (train.sigterm_grace_s)",
                  file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._wake_r], [], [], POLL_S)
            if ready:
                try:
                    if bytes([signal.SIGTERM]) in os.read(self._wake_r, 64):
                        self._note_sigterm()
                except BlockingIOError:
                    pass
            if self._stop.is_set():
                return
            if self._ppid is not None and os.getppid() != self._ppid:
                print(f"rank {self.rank}: the launcher (pid {self._ppid}) is gone; exiting", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_ORPHANED)
            deadline = min(self._deadline, self._term_deadline)
            now = time.monotonic()
            if now >= deadline:
                self._fire(now)
            # The C-level backstop follows the deadline, BACKSTOP_S behind; re-armed only when the deadline moved
            # by half of that (each re-arm replaces faulthandler's C thread: not every step, as a fork of a
            # DataLoader worker at that moment has been seen to hang).
            if self._armed is None or abs(deadline - self._armed) > BACKSTOP_S / 2:
                faulthandler.dump_traceback_later(max(1.0, deadline - now) + BACKSTOP_S, exit=True)
                self._armed = deadline

    def _fire(self, now: float) -> None:
        """Write every thread's stack to run_dir/hang/rank<R>.txt, say so in one line, and exit at once."""
        by_signal = self._term_deadline <= self._deadline
        if by_signal:
            why, code = f"the SIGTERM grace period ({self.grace_s:g} s) ended", EXIT_TERMINATED
        else:
            why, code = f"no progress for {self.timeout_s:g} s (train.hang_timeout_s)", EXIT_HANG
        where = f" at step {self.step}" if self.step is not None else ""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # Not through a link planted at this predictable name.
            with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "w") as f:
                f.write(f"rank {self.rank} (pid {os.getpid()}): {why} in {self.what}{where}; "
                        f"stacks of every thread:\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            saved = f"stacks in {self.path}"
        except OSError as err:
            saved = f"could not write {self.path} ({err})"
        print(f"rank {self.rank}: {why} in {self.what}{where}; {saved}; exiting {code} so that the launcher "
              f"ends the job (relaunch the same command to resume)", file=sys.stderr, flush=True)
        os._exit(code)


def start(cfg) -> Watchdog:
    """The trainer's watchdog, before the process group exists (a peer that never joins is a hang too)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return Watchdog(cfg.run_dir, rank, cfg.train.hang_timeout_s, cfg.train.sigterm_grace_s,
                    orphan_check=launched_by_launcher())


def _reset_in_child() -> None:
    """A forked child (a DataLoader worker) must not write into the parent's wakeup pipe, and holds SIGTERM
    back: torchrun signals each rank's process group and SLURM every process of the step, and a worker dying
    under the trainer would end the step in an error instead of the save. Blocked, not ignored: torch's worker
    loop installs its own SIGTERM handler. Workers still end with their parent (torch's worker loop watches
    it), and SIGKILL still ends them."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread of the child
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def collective_timeout_s(hang_timeout_s: float) -> float:
    """The process group's timeout: the hang deadline plus a minute, so the watchdog (with stacks) fires first."""
    return float(hang_timeout_s) + 60.0


def launched_by_launcher() -> bool:
    """Whether a launcher (torchrun, deepspeed, srun) started this rank: only then is a new parent an orphan
    (a bare `python -m pipeline.pretrain` under nohup must outlive its shell)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class StopPoll:
    """When the ranks agree whether to stop (a SIGTERM on any rank, a save request): every K steps, not every
    step, since agreeing is a collective whose result the host must read (a device->host sync that stalls
    the GPU's queue of launched work).

    K follows the step time so that a poll comes about every `every_s` seconds (train.stop_check_s): what a
    SIGTERM can lose of its grace (SLURM's KillWait is typically 30 s, torchrun's and Kubernetes' 30 s or
    more) before the ranks notice it. It is measured between polls, averaged over ranks inside the poll's
    own all-reduce, so every rank computes the same next poll step: ranks must agree on WHEN they poll, hence
    a step number and not a clock. The first two steps poll (the first includes compilation and warm-up);
    the trainer also polls at every log step, where it synchronises anyway.
    """

    def __init__(self, every_s: float, request_path: str, is_main: bool, watchdog: "Watchdog"):
        self.every_s, self.request_path, self.is_main, self.watchdog = every_s, request_path, is_main, watchdog
        self.restart(0)

    def restart(self, step: int) -> None:
        """Poll at the next step and measure afresh (start, rollback)."""
        self.next_step, self._since, self._t0 = step + 1, step, None

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def __call__(self, step: int, last_save_s: Optional[float]) -> Optional[str]:
        """None, "request" (the request file exists: rank 0 looks), "sigterm-save" or "sigterm-exit": alike on
        every rank. After a SIGTERM on any rank, save only if every signalled rank has more grace left than the
        last save took. With no save yet in this run (nor in the checkpoint it resumed) there is no estimate:
        try one while grace is left, since everything since the start is otherwise lost and a save cut off by
        the SIGKILL is never marked complete."""
        import torch

        from pipeline.runtime import distributed as D

        requested = self.is_main and os.path.exists(self.request_path)
        wd = self.watchdog
        left = wd.grace_left()  # inf before a SIGTERM
        no_time = wd.signalled and (left <= 0 or (last_save_s is not None and last_save_s >= left))
        now = time.monotonic()
        per_step = (now - self._t0) / max(1, step - self._since) if self._t0 is not None else 0.0
        flags = D.all_reduce_sum(torch.tensor([requested, wd.signalled, no_time, per_step], dtype=torch.float64))
        requested_n, signalled_n, no_time_n, per_step_sum = flags.tolist()
        per_step = per_step_sum / (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        self.next_step = step + (max(1, int(self.every_s / per_step)) if per_step > 0 else 1)
        self._since, self._t0 = step, time.monotonic()
        if signalled_n > 0:
            return "sigterm-exit" if no_time_n > 0 else "sigterm-save"
        return "request" if requested_n > 0 else None
