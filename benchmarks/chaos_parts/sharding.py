"""Chaos for sharding: a data_prep Ray job SIGKILLed at random moments, compared byte for byte with an
uninterrupted run (see benchmarks/chaos.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
from chaos_parts.launch import PY, SHARD_TARGETS, log, base_env, Launch, Kill, Outcome  # noqa: E402


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
