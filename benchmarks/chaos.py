"""Chaos harness (issue 13): SIGKILL a 2-rank training job and a Ray shard job at random moments, relaunch the
same command until it completes, and check the end result is bit-identical to an uninterrupted run.

Only the command lines and on-disk formats of the README are used:

  training  torchrun --nproc_per_node 2 -m pipeline.pretrain --config configs/demo/pretrain.yaml key=value ...
            RUN/checkpoints/step_XXXXXXXX/complete.json, RUN/metrics.jsonl, DeepSpeed's
            get_fp32_state_dict_from_zero_checkpoint (the final checkpoints of both runs, torch.equal per tensor)
  sharding  python -m data_prep shard IMAGES OUT --split train --shard-size S --workers 2
            OUT/train-NNNNNN.tar (sha256 of each) and the `shards` entries of OUT/_info.json

Kill targets: a training rank (one process), the torchrun launcher with its whole process group, the data_prep
driver (one process; its private Ray must die with it, leftovers are counted and killed), one Ray worker
process of the shard job (Ray retries its task). Kill moments are drawn by a seeded RNG between a launch and
its expected end (measured by the uninterrupted run). For training the draw is stratified over three windows
so that some kills land in each: `init` (launcher, imports, DeepSpeed init, resume), `step` (a random moment
inside a random remaining step) and `save` (while a checkpoint folder exists without its complete.json).

    .venv/bin/python benchmarks/chaos.py                            # K=5 kills each, 40 steps, 400 images
    .venv/bin/python benchmarks/chaos.py --seed 3 --kills-train 8 --kills-shard 8 --workdir runs/chaos

Every process the harness starts runs in its own session and is SIGKILLed by process group at the end, plus
every descendant it saw (Ray's processes included), so nothing outlives it. Exit 0 only if both results are
identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def ckpt_steps(run_dir: Path) -> tuple[int, int | None]:
    """(newest step with complete.json, newest step folder without it that is newer: a save in progress)."""
    complete, partial = 0, None
    for path in (run_dir / "checkpoints").glob("step_*"):
        try:
            step = int(path.name[5:])
        except ValueError:
            continue
        if (path / "complete.json").exists():
            complete = max(complete, step)
        elif partial is None or step > partial:
            partial = step
    if partial is not None and partial <= complete:
        partial = None
    return complete, partial


def metric_records(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line half-written at the kill
        if isinstance(rec, dict) and "loss" in rec and "step" in rec:
            out.append(rec)
    return out


def fresh_step(run_dir: Path, launch: Launch, start_step: int) -> int:
    """The newest step this launch logged: metrics.jsonl counts only once this launch has rewritten it (the
    trainer drops records after the resumed step), so stale records of a killed launch are not counted."""
    path = run_dir / "metrics.jsonl"
    try:
        if path.stat().st_mtime < launch.started_wall:
            return start_step
    except OSError:
        return start_step
    steps = [r["step"] for r in metric_records(run_dir)]
    return max([start_step, *steps])


class Training:
    def __init__(self, args, shards: Path, root: Path):
        self.args, self.shards, self.root = args, shards, root
        self.steps, self.every = args.steps, args.every

    def cmd(self, run_dir: Path) -> list[str]:
        overrides = {
            "run_dir": run_dir, "data.train": self.shards, "data.val": "null", "train.steps": self.steps,
            "checkpoint.every_steps": self.every, "checkpoint.keep": 2, "train.log_every": 1,
            "data.num_workers": self.args.train_workers, "train.deterministic": "true",
        }
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), "-m", "pipeline.pretrain", "--config", TRAIN_CONFIG,
                *[f"{k}={v}" for k, v in overrides.items()]]

    def reference(self) -> tuple[float, float, float]:
        """Uninterrupted run: (wall s, init s until step 1 is logged, s per step)."""
        run_dir = self.root / "train-reference"
        launch = Launch(self.cmd(run_dir), self.root / "train-reference.log", base_env())
        first = None
        try:
            deadline = time.monotonic() + self.args.launch_timeout
            while launch.running():
                if first is None and fresh_step(run_dir, launch, 0) >= 1:
                    first = launch.elapsed()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reference training exceeded {self.args.launch_timeout}s")
                time.sleep(0.05)
            wall = launch.elapsed()
        finally:
            launch.cleanup()
        if launch.proc.returncode != 0:
            raise RuntimeError(f"reference training failed:\n{launch.text()[-4000:]}")
        first = first if first is not None else wall
        step_s = max(0.05, (wall - first) / max(1, self.steps - 1))
        return wall, first, step_s

    def chaos(self, rng: random.Random, kills: int, ref: tuple[float, float, float]) -> Outcome:
        wall_ref, init_s, step_s = ref
        out = Outcome("training", planned=kills, ref_s=wall_ref)
        run_dir = self.root / "train-chaos"
        # stratified windows: every window once per round, in a random order
        windows: list[str] = []
        while len(windows) < kills:
            chunk = ["init", "step", "save"]
            rng.shuffle(chunk)
            windows += chunk
        windows = windows[:kills]
        t0 = time.monotonic()
        while True:
            out.launches += 1
            start_step = ckpt_steps(run_dir)[0]
            launch = Launch(self.cmd(run_dir), self.root / f"train-chaos-{out.launches:02d}.log", base_env())
            deadline = time.monotonic() + self.args.launch_timeout
            kill = None
            if len(out.kills) < kills:
                window = windows[len(out.kills)]
                target = rng.choice(TRAIN_TARGETS)
                kill = self._kill(rng, launch, run_dir, start_step, window, target, init_s, step_s, deadline,
                                  len(out.kills) + 1, out.launches, kills - len(out.kills))
            if kill is not None:
                out.kills.append(kill)
                kill.resumed = ckpt_steps(run_dir)[0]
                log(f"[train] kill {kill.n}/{kills}: {kill.target} ({kill.victim}) at {kill.at_s:.1f}s into "
                    f"launch {kill.launch}, window {kill.window}, landed in {kill.landed_in}: newest complete "
                    f"checkpoint step {kill.newest_complete}, step reached {kill.reached}, next launch resumes "
                    f"from step {kill.resumed} ({kill.redone} steps redone); launcher exit {kill.exit_code}, "
                    f"{kill.stragglers} process(es) of the launch left after 0.5 s")
                continue
            rc = launch.wait(max(1.0, deadline - time.monotonic()))
            launch.cleanup()
            if rc == 0:
                out.completed = True
                break
            out.failures += 1
            log(f"[train] launch {out.launches} ended with {rc} without a kill (see {launch.log_path})")
            if out.failures > 2:
                break
        out.chaos_s = time.monotonic() - t0
        self._check_resumes(out)
        if out.completed:
            out.identical, out.detail = self.compare(self.root / "train-reference", run_dir)
        else:
            out.detail = "the chaos run did not complete"
        return out

    def _check_resumes(self, out: Outcome) -> None:
        """Cross-check against the trainer's own 'resumed from ... at step N' line in the next launch's log."""
        for kill in out.kills:
            path = self.root / f"train-chaos-{kill.launch + 1:02d}.log"
            try:
                found = re.findall(r"resumed from \S+ at step (\d+)", path.read_text(errors="replace"))
            except OSError:
                continue
            if not found:  # killed before it resumed, or started from scratch: nothing to cross-check
                continue
            said = int(found[-1])
            if said != kill.resumed:
                log(f"[train] note: after kill {kill.n} the trainer says it resumed from step {said}, "
                    f"newest complete checkpoint was {kill.resumed}")
                kill.resumed = said

    def _kill(self, rng, launch: Launch, run_dir: Path, start_step: int, window: str, target: str, init_s: float,
              step_s: float, deadline: float, n: int, launch_no: int, kills_left: int) -> Kill | None:
        remaining = self.steps - start_step
        # leave room for the kills still to come: aim within this launch's share of the remaining steps
        # (a kill after the final checkpoint would leave nothing to kill)
        horizon = min(self.steps, start_step + max(2, -(-2 * remaining // (kills_left + 1))))
        if kills_left == 1:
            horizon = self.steps
        if window == "save" and remaining < 1:
            window = "init"
        if window == "step" and remaining < 2:
            window = "init"
        save_at = None
        if window == "save":
            choices = [s for s in range(start_step + 1, self.steps + 1) if s % self.every == 0 or s == self.steps]
            save_at = rng.choice([s for s in choices if s <= horizon] or choices[:1])
            delay = rng.uniform(0, 0.5 * step_s)
        elif window == "step":
            step_at = rng.randrange(start_step + 1, max(start_step + 2, min(horizon, self.steps)))  # inside step_at + 1
            delay = rng.uniform(0, step_s)
        else:
            at = rng.uniform(0, init_s)
        # wait for the moment
        while launch.running() and time.monotonic() < deadline:
            if window == "init" and (launch.elapsed() >= at or fresh_step(run_dir, launch, start_step) > start_step):
                break  # init took less than the reference's (load varies): kill as the first step is logged
            if window == "step" and fresh_step(run_dir, launch, start_step) >= step_at:
                time.sleep(delay)
                break
            if window == "save":
                partial = ckpt_steps(run_dir)[1]
                if partial is not None and partial >= save_at:
                    time.sleep(delay)
                    break
                if ckpt_steps(run_dir)[0] >= save_at:  # the save went by between two polls
                    break
            time.sleep(0.005 if window != "init" else 0.02)
        if not launch.running() or time.monotonic() >= deadline:
            return None
        # find the victim (ranks may not exist yet early in init: wait for them)
        victim = None
        while launch.running() and time.monotonic() < deadline:
            if target == "launcher":
                victim = f"torchrun pid {launch.pgid} + process group"
                break
            ranks = []
            try:
                for child in psutil.Process(launch.pgid).children():
                    if "pipeline.pretrain" in " ".join(child.cmdline()):
                        ranks.append(child)
            except psutil.Error:
                pass
            if len(ranks) == 2:
                victim_proc = rng.choice(ranks)
                victim = f"rank pid {victim_proc.pid}"
                break
            time.sleep(0.01)
        if victim is None:
            return None
        newest, partial = ckpt_steps(run_dir)
        reached = fresh_step(run_dir, launch, start_step)
        landed = "save" if partial is not None else ("step" if reached > start_step else "init")
        at_s = launch.elapsed()
        try:
            if target == "launcher":
                os.killpg(launch.pgid, signal.SIGKILL)
            else:
                victim_proc.send_signal(signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            return None
        if target == "rank":  # torchrun sees the dead rank, stops the other one and exits non-zero
            exit_code = launch.wait(60)
        else:
            exit_code = launch.wait(10)
        # torchrun starts each rank in a session of its own: killing the launcher's process group leaves the
        # ranks running as orphans. Count what is left after a short grace, then kill it (as a lost node would).
        time.sleep(0.5)
        stragglers = [p for p in launch.leftovers() if p.pid != launch.pgid]
        launch.cleanup()
        reached = max(reached, fresh_step(run_dir, launch, start_step))  # a step logged just before the kill
        return Kill(n=n, target=target, window=window, launch=launch_no, at_s=at_s, victim=victim,
                    newest_complete=newest, reached=reached, landed_in=landed, stragglers=len(stragglers),
                    exit_code=exit_code if exit_code is not None else launch.proc.returncode)

    def compare(self, ref: Path, chaos: Path) -> tuple[bool, str]:
        tag = f"step_{self.steps:08d}"
        problems = []
        for run in (ref, chaos):
            if not (run / "checkpoints" / tag / "complete.json").exists():
                problems.append(f"{run.name}: no complete {tag}")
        if problems:
            return False, "; ".join(problems)
        script = (
            "import json, sys, torch\n"
            "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as get\n"
            "a = get(sys.argv[1], tag=sys.argv[3]); b = get(sys.argv[2], tag=sys.argv[3])\n"
            "differ = [k for k in a if k in b and not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape"
            " and torch.equal(a[k], b[k]))]\n"
            "print('RESULT ' + json.dumps({'tensors': len(a), 'only_ref': sorted(set(a) - set(b)),"
            " 'only_chaos': sorted(set(b) - set(a)), 'differ': differ}))\n"
        )
        out = run_checked([PY, "-c", script, str(ref / "checkpoints"), str(chaos / "checkpoints"), tag],
                          timeout=600)
        result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        weights_ok = not (result["only_ref"] or result["only_chaos"] or result["differ"])
        ref_m = {r["step"]: r for r in metric_records(ref)}
        chaos_m = {r["step"]: r for r in metric_records(chaos)}
        steps_ok = sorted(ref_m) == sorted(chaos_m) == list(range(1, self.steps + 1))
        loss_diff = [s for s in ref_m if s in chaos_m and (ref_m[s]["loss"] != chaos_m[s]["loss"]
                                                           or ref_m[s].get("lr") != chaos_m[s].get("lr"))]
        detail = (f"{result['tensors']} tensors, {len(result['differ'])} differ"
                  f"{' (' + ', '.join(result['differ'][:5]) + ')' if result['differ'] else ''}; "
                  f"metrics steps {'match' if steps_ok else 'DIFFER'} ({len(ref_m)} vs {len(chaos_m)}), "
                  f"{len(loss_diff)} step(s) with a different loss/lr"
                  f"{' (first ' + str(min(loss_diff)) + ')' if loss_diff else ''}")
        return weights_ok and steps_ok and not loss_diff, detail


# ----------------------------------------------------------------------------------------------------------
# Shard job
# ----------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Sharding:
    def __init__(self, args, images: Path, root: Path, ray_tmp: Path):
        self.args, self.images, self.root, self.ray_tmp = args, images, root, ray_tmp

    def cmd(self, out: Path) -> list[str]:
        return [PY, "-m", "data_prep", "shard", str(self.images), str(out), "--split", "train", "--shard-size",
                str(self.args.shard_size), "--seed", "0", "--workers", "2", "--no-progress"]

    def env(self) -> dict[str, str]:
        return base_env(RAY_TMPDIR=str(self.ray_tmp))  # short path: Ray's socket names must fit 107 bytes

    def reference(self) -> float:
        out = self.root / "shards-reference"
        launch = Launch(self.cmd(out), self.root / "shards-reference.log", self.env())
        self.first_shard_s = None
        try:
            deadline = time.monotonic() + self.args.launch_timeout
            while launch.running() and time.monotonic() < deadline:
                if self.first_shard_s is None and any(out.glob("train-*.tar")):
                    self.first_shard_s = launch.elapsed()
                time.sleep(0.02)
            rc = launch.wait(1)
            wall = launch.elapsed()
        finally:
            launch.cleanup()
        if rc != 0:
            raise RuntimeError(f"reference shard job failed ({rc}):\n{launch.text()[-4000:]}")
        if self.first_shard_s is None:
            self.first_shard_s = 0.5 * wall
        return wall

    def chaos(self, rng: random.Random, kills: int, ref_s: float) -> Outcome:
        out = Outcome("sharding", planned=kills, ref_s=ref_s)
        dest = self.root / "shards-chaos"
        total = len(json.loads((self.root / "shards-reference" / "_info.json").read_text())
                    ["splits"]["train"]["filenames"])
        t0 = time.monotonic()
        launch = None
        while True:
            if launch is None or not launch.running():
                if launch is not None:
                    rc = launch.proc.returncode
                    launch.cleanup()
                    if rc == 0 and len(out.kills) >= kills:
                        out.completed = True
                        break
                    if rc == 0:  # finished before the remaining kills: nothing left to kill
                        out.completed = True
                        log(f"[shard] the job completed with {kills - len(out.kills)} kill(s) not landed")
                        break
                    if not (out.kills and out.kills[-1].launch == out.launches):
                        out.failures += 1
                        log(f"[shard] launch {out.launches} ended with {rc} without a kill by us "
                            f"(see {launch.log_path})")
                        if out.failures > 3:
                            break
                out.launches += 1
                launch = Launch(self.cmd(dest), self.root / f"shards-chaos-{out.launches:02d}.log", self.env())
                deadline = time.monotonic() + self.args.launch_timeout
            if time.monotonic() > deadline:
                log(f"[shard] launch {out.launches} exceeded --launch-timeout")
                launch.cleanup()
                break
            if len(out.kills) >= kills:
                rc = launch.wait(max(1.0, deadline - time.monotonic()))
                if rc is None:
                    log("[shard] launch timed out")
                    launch.cleanup()
                    break
                continue
            # a uniform moment of the job: in its start-up (Ray, listing, scan, plan) by the clock, in its
            # writing phase by the shards written so far (a relaunch has fewer left to write)
            u = rng.uniform(0, 0.95) * ref_s
            done = len(list(dest.glob("train-*.tar")))
            if u < self.first_shard_s and launch.elapsed() < self.first_shard_s and done == 0:
                when = ("clock", u)
            else:
                frac = max(0.0, (u - self.first_shard_s) / max(1e-6, ref_s - self.first_shard_s))
                per_shard = (ref_s - self.first_shard_s) / max(1, total) * 2  # 2 workers
                when = ("shards", done + int(frac * (total - done)), rng.uniform(0, per_shard))
            target = rng.choice(SHARD_TARGETS)
            kill = self._kill(rng, launch, dest, when, target, deadline, len(out.kills) + 1, out.launches, total)
            if kill is None:
                continue  # the launch ended first: relaunch or finish above
            out.kills.append(kill)
            log(f"[shard] kill {kill.n}/{kills}: {kill.target} ({kill.victim}) at {kill.at_s:.1f}s into launch "
                f"{kill.launch}, landed in {kill.landed_in}; {kill.stragglers} process(es) of the job left "
                f"after 2 s{'' if kill.target == 'driver' else ' (job continues: Ray retries the task)'}")
        out.chaos_s = time.monotonic() - t0
        if out.completed:
            out.identical, out.detail = self.compare(self.root / "shards-reference", dest)
        else:
            out.detail = "the chaos job did not complete"
        return out

    def _kill(self, rng, launch: Launch, dest: Path, when: tuple, target: str, deadline: float, n: int,
              launch_no: int, total: int) -> Kill | None:
        while launch.running() and time.monotonic() < deadline:
            if when[0] == "clock" and launch.elapsed() >= when[1]:
                break
            if when[0] == "shards" and len(list(dest.glob("train-*.tar"))) >= when[1]:
                time.sleep(when[2])
                break
            time.sleep(0.02)
        victim_proc = None
        while launch.running() and time.monotonic() < deadline:
            if target == "driver":
                victim_proc = psutil.Process(launch.pgid)
                break
            busy = []  # task workers running a task: `ray::<function>` (not ray::IDLE, not Ray's agents)
            for proc in launch.descendants():
                try:
                    title = (proc.cmdline() or [""])[0]
                except psutil.Error:
                    continue
                if re.match(r"ray::[a-z_]", title):
                    busy.append((proc, title))
            if busy:
                victim_proc, title = rng.choice(busy)
                break
            time.sleep(0.01)
        if victim_proc is None or not launch.running():
            return None
        done = len(list(dest.glob("train-*.tar")))
        if target == "driver":
            victim = f"driver pid {victim_proc.pid}"
        else:
            victim = f"{title.split()[0]} pid {victim_proc.pid}"
        landed = ("startup/scan" if not (dest / "_state").exists() or done == 0 else f"write ({done}/{total} shards)")
        if target == "ray-worker" and "scan" in victim:
            landed = "scan"
        at_s = launch.elapsed()
        try:
            victim_proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            return None
        stragglers = 0
        if target == "driver":
            launch.wait(10)
            time.sleep(2.0)  # the private Ray should die with its driver
            left = [p for p in launch.leftovers() if p.pid != launch.pgid]
            stragglers = len(left)
            if left:
                names = []
                for proc in left:
                    try:
                        names.append(os.path.basename((proc.cmdline() or [proc.name()])[0]))
                    except psutil.Error:
                        pass
                victim += f"; left alive: {', '.join(sorted(names))}"
            launch.cleanup()
        return Kill(n=n, target=target, window="uniform", launch=launch_no, at_s=at_s, victim=victim,
                    landed_in=landed, stragglers=stragglers, exit_code=None)

    @staticmethod
    def compare(ref: Path, chaos: Path) -> tuple[bool, str]:
        tars_ref = {p.name: sha256(p) for p in sorted(ref.glob("train-*.tar"))}
        tars_chaos = {p.name: sha256(p) for p in sorted(chaos.glob("train-*.tar"))}
        info_ref = json.loads((ref / "_info.json").read_text())["splits"]["train"]
        info_chaos = json.loads((chaos / "_info.json").read_text())["splits"]["train"]
        differ = sorted(k for k in set(tars_ref) | set(tars_chaos) if tars_ref.get(k) != tars_chaos.get(k))
        entries_ok = info_ref["shards"] == info_chaos["shards"]
        recorded_ok = all(s["sha256"] == tars_chaos.get(s["filename"]) for s in info_chaos["shards"])
        temps = [p.name for p in chaos.glob(".*") if p.is_file()]
        detail = (f"{len(tars_ref)} shards, {len(differ)} differ{' (' + ', '.join(differ[:5]) + ')' if differ else ''};"
                  f" _info.json shards entries {'equal' if entries_ok else 'DIFFER'}, recorded sha256 "
                  f"{'match' if recorded_ok else 'MISMATCH'}; {info_chaos['num_samples']} samples; "
                  f"{len(temps)} stray temp file(s)")
        return bool(tars_ref) and not differ and entries_ok and recorded_ok, detail


# ----------------------------------------------------------------------------------------------------------
def summary(outcomes: list[Outcome]) -> str:
    rows = [("job", "target", "kills", "landed in", "faults survived", "steps redone", "stragglers",
             "ref s", "chaos s", "time lost s", "identical")]
    for o in outcomes:
        targets = TRAIN_TARGETS if o.name == "training" else SHARD_TARGETS
        for target in targets:
            ks = [k for k in o.kills if k.target == target]
            landed: dict[str, int] = {}
            for k in ks:
                key = k.landed_in.split(" (")[0]
                landed[key] = landed.get(key, 0) + 1
            rows.append((o.name, target, str(len(ks)), ", ".join(f"{v} {k}" for k, v in sorted(landed.items())) or "-",
                         "", str(sum(k.redone for k in ks)) if o.name == "training" else "-",
                         str(sum(k.stragglers for k in ks)), "", "", "", ""))
        survived = len(o.kills) if o.completed else max(0, len(o.kills) - 1)
        rows.append((o.name, "all", f"{len(o.kills)}/{o.planned}", f"{o.launches} launches, {o.failures} other failures",
                     str(survived), str(sum(k.redone for k in o.kills)) if o.name == "training" else "-",
                     str(sum(k.stragglers for k in o.kills)), f"{o.ref_s:.1f}", f"{o.chaos_s:.1f}",
                     f"{o.chaos_s - o.ref_s:+.1f}", "yes" if o.identical else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for o in outcomes:
        lines.append(f"{o.name}: {o.detail}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the kill plan (default 0)")
    p.add_argument("--kills-train", type=int, default=5, help="SIGKILLs of the training job (default 5)")
    p.add_argument("--kills-shard", type=int, default=5, help="SIGKILLs of the shard job (default 5)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to put images, shards, runs and logs (default: a temporary folder, removed after)")
    p.add_argument("--images", type=int, default=400,
                   help="images for the shard job (4 classes; default 400); training always uses 4 x 40")
    p.add_argument("--shard-size", type=int, default=10, help="samples per shard in the shard job (default 10)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--every", type=int, default=5, help="checkpoint.every_steps (default 5)")
    p.add_argument("--train-workers", type=int, default=0, choices=(0, 1), help="data.num_workers (default 0)")
    p.add_argument("--only", choices=("train", "shard"), default=None, help="run only one of the two jobs")
    p.add_argument("--launch-timeout", type=float, default=900, help="seconds one launch may take (default 900)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    temp_root = None
    if args.workdir is None:
        temp_root = Path(tempfile.mkdtemp(prefix="chaos-"))
        root = temp_root
    else:
        root = args.workdir.resolve()
        if root.exists() and any(root.iterdir()):
            log(f"error: --workdir {root} is not empty")
            return 2
        root.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="chaos-ray-", dir="/tmp"))
    outcomes: list[Outcome] = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or a scheduler: clean up first
    try:
        train_images = root / "images-train"
        data_cmd = [PY, "-m", "data_prep", "demo-data", str(train_images), "--classes", "4", "--per-class", "40",
                    "--size", "40", "--seed", "0", "--label-set", "shape-color"]
        run_checked(data_cmd, timeout=300)
        shard_images = train_images
        if args.images != 160 and args.only != "train":
            shard_images = root / "images-shard"
            run_checked([*data_cmd[:4], str(shard_images), "--classes", "4", "--per-class",
                         str(max(1, args.images // 4)), *data_cmd[9:]], timeout=300)
        log(f"workdir {root}; seed {args.seed}")
        if args.only in (None, "train"):
            shards = root / "train-shards"
            run_checked([PY, "-m", "data_prep", "shard", str(train_images), str(shards), "--split", "train",
                         "--shard-size", "32", "--seed", "0", "--workers", "1", "--no-progress"], timeout=600,
                        env=base_env(RAY_TMPDIR=str(ray_tmp)))
            training = Training(args, shards, root)
            ref = training.reference()
            log(f"[train] uninterrupted: {ref[0]:.1f}s ({ref[1]:.1f}s until step 1, {ref[2]:.2f}s per step), "
                f"{args.steps} steps, checkpoint every {args.every}")
            outcomes.append(training.chaos(rng, args.kills_train, ref))
        if args.only in (None, "shard"):
            sharding = Sharding(args, shard_images, root, ray_tmp)
            ref_s = sharding.reference()
            log(f"[shard] uninterrupted: {ref_s:.1f}s for {args.images} images, shard size {args.shard_size}")
            outcomes.append(sharding.chaos(rng, args.kills_shard, ref_s))
    finally:
        for launch in list(_ACTIVE):
            launch.cleanup()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    table = summary(outcomes)
    log("\n" + table)
    ok = bool(outcomes) and all(o.identical for o in outcomes)
    if args.workdir is not None:
        (root / "summary.json").write_text(json.dumps(
            [{"job": o.name, "identical": o.identical, "completed": o.completed, "planned": o.planned,
              "kills": [dict(vars(k), redone=k.redone) for k in o.kills], "launches": o.launches,
              "failures": o.failures, "ref_s": o.ref_s, "chaos_s": o.chaos_s, "detail": o.detail}
             for o in outcomes], indent=1))
    log("RESULT: " + ("identical" if ok else "NOT identical"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
