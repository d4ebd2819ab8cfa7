"""Chaos harness building blocks: launching a command in its own session, tracking and killing every
process it starts, and the records of kills and outcomes (see benchmarks/chaos.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = Path(PY).parent
TRAIN_CONFIG = "configs/demo/pretrain.yaml"
TRAIN_TARGETS = ("rank", "launcher")
SHARD_TARGETS = ("driver", "ray-worker")
_ACTIVE: set = set()  # launches not cleaned up yet: killed by main() on any exit, SIGTERM included


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_checked(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    res = subprocess.run(cmd, cwd=REPO, env=env or base_env(), capture_output=True, text=True, timeout=timeout,
                         start_new_session=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------------------
# One launch of a command: own session, every descendant remembered, all of it killed at the end
# ----------------------------------------------------------------------------------------------------------
class Launch:
    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pgid = self.proc.pid
        _ACTIVE.add(self)
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant ever seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tracker = threading.Thread(target=self._track, daemon=True)
        self._tracker.start()

    def _track(self) -> None:
        while not self._stop.is_set():
            self.descendants()
            self._stop.wait(0.2)

    def descendants(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        with self._lock:
            for proc in procs:
                try:
                    self.seen.setdefault(proc.pid, proc.create_time())
                except psutil.Error:
                    pass
        return procs

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this launch still alive: its session/process group and every descendant seen."""
        alive = {}
        with self._lock:
            seen = dict(self.seen)
        for pid, created in seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = proc
            except psutil.Error:
                pass
        for proc in psutil.process_iter():
            try:
                if proc.pid not in alive and os.getsid(proc.pid) == self.pgid and proc.pid != os.getpid():
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive[proc.pid] = proc
            except (psutil.Error, OSError):
                pass
        return list(alive.values())

    def cleanup(self) -> int:
        """SIGKILL the process group and every leftover; returns how many processes were still alive."""
        self.descendants()
        self._stop.set()
        self._tracker.join(timeout=5)
        left = [p for p in self.leftovers() if p.pid != self.proc.pid]
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=15)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        _ACTIVE.discard(self)
        return len(left)

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Kill:
    n: int
    target: str
    window: str
    launch: int
    at_s: float            # seconds into the launch
    victim: str
    newest_complete: int = 0   # training: newest complete checkpoint at the kill
    reached: int = 0           # training: newest step this launch had finished
    resumed: int = 0           # training: where the next launch resumed (newest complete after the kill)
    landed_in: str = ""        # state at the kill: init / step / save / write ...
    stragglers: int = 0        # processes of the killed launch still alive 2 s after the kill
    exit_code: int | None = None

    @property
    def redone(self) -> int:
        return max(0, self.reached - self.resumed)


@dataclass
class Outcome:
    name: str
    kills: list[Kill] = field(default_factory=list)
    planned: int = 0
    launches: int = 0
    failures: int = 0          # launches that ended non-zero without being killed by us
    ref_s: float = 0.0
    chaos_s: float = 0.0
    completed: bool = False
    identical: bool = False
    detail: str = ""
