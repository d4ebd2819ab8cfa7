"""Holds SIGTERM back in the forkserver that starts DataLoader workers on GPUs, and so in every worker.

Imported only as the forkserver's preload (watchdog.Watchdog sets it; multiprocessing imports it in the
forkserver before that forks any worker). Why: the trainer's fork hook (watchdog._reset_in_child) never runs
there, since the forkserver is started by fork+exec. torchrun and slurmstepd signal each rank's whole process
group, the forkserver and its workers included: a worker dying under the trainer (or the forkserver, whose
death its workers take for their parent's) would fail `next(loader)` before the stop poll saves. Blocked as
well as ignored: torch's worker loop installs handlers of its own. SIGKILL still ends them, and workers still
end with the trainer (the forkserver exits when the trainer does; its workers watch it).
"""
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
