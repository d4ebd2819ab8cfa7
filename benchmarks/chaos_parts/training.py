"""Chaos for training: a 2-rank torchrun job SIGKILLed at random moments, compared with an uninterrupted run
(see benchmarks/chaos.py)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
from chaos_parts.launch import PY, BIN, TRAIN_CONFIG, TRAIN_TARGETS, log, free_port, base_env, run_checked, Launch, Kill, Outcome  # noqa: E402


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
