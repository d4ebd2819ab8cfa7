"""Faults a long run meets, with real processes: a frozen rank, a dead launcher, SIGTERM, a damaged checkpoint,
a full disk (trainer and data_prep). Each ends in a known state from which the same command continues.

CPU ranks on the conftest demo shards, coatnet-nano at 32 px: a step takes seconds, so the timeouts are small.
The full-disk tests mount a small tmpfs (root) or set RLIMIT_FSIZE on the launched process.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HANG = 60  # train.hang_timeout_s in these tests: above a CPU step and the start-up on 2 busy shared cores


def overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {"run_dir": str(run_dir), "data.train": str(shards), "data.val": None, "data.image_size": 32,
              "data.num_workers": 1, "data.shuffle_buffer": 64, "data.randaugment_layers": 0,
              "model.name": "coatnet-nano", "train.global_batch_size": 16, "train.micro_batch_size": 4,
              "train.steps": 4, "train.log_every": 1, "optim.warmup_steps": 2, "checkpoint.every_steps": 2,
              "checkpoint.keep": 3, "deepspeed.zero_stage": 2, "precision": "fp32", "train.hang_timeout_s": HANG}
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DEEPSPEED_TIMEOUT"):
        env.pop(key, None)
    return env


def single(ov: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.pretrain", *ov]


def torchrun(ov: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), "-m", "pipeline.pretrain", *ov]


def launch(cmd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def run(cmd, expect_rc=0, timeout=300, **kwargs) -> str:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)
    out = res.stdout + res.stderr
    assert res.returncode == expect_rc, f"rc {res.returncode}\n{out[-6000:]}"
    return out


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/complete.json"))


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0) if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def ranks_of(launcher_pid: int) -> dict[int, psutil.Process]:
    """torchrun's rank processes (its direct children), by RANK."""
    out = {}
    for child in psutil.Process(launcher_pid).children():
        rank = child.environ().get("RANK")
        if rank is not None:
            out[int(rank)] = child
    return out


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def assert_intact(run_dir: Path) -> None:
    """Every checkpoint marked complete has every recorded file, at its size and checksum."""
    from pipeline.checkpoint.integrity import verify_share

    for marker in (run_dir / "checkpoints").glob("step_*/complete.json"):
        meta = json.loads(marker.read_text())
        assert meta["files"] and verify_share(str(marker.parent), meta, 0, 1) == [], marker


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_rank_ends_the_job_with_stack_dumps_and_the_same_command_resumes(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    ov = overrides(demo_shards, run_dir, **{"train.steps": 300})
    proc = launch(torchrun(ov))
    ranks = {}
    try:
        wait_for(lambda: 2 in complete_steps(run_dir), proc, 300)
        ranks = ranks_of(proc.pid)
        ranks[1].send_signal(signal.SIGSTOP)  # frozen from outside: it cannot even run its own watchdog
        frozen = time.monotonic()
        out, _ = proc.communicate(timeout=HANG + 150)
        took = time.monotonic() - frozen
    finally:
        kill_all([*ranks.values(), proc])
    assert proc.returncode != 0
    # rank 0 waits in a collective: its watchdog fires after HANG s; torchrun then SIGKILLs the frozen rank
    assert took < HANG + 60, (took, out[-3000:])
    dump = (run_dir / "hang" / "rank0.txt").read_text()
    assert f"no progress for {HANG} s" in dump and 'File "' in dump and "rank 0: no progress" in out
    saved = complete_steps(run_dir)[-1]
    print(f"frozen rank: job ended {took:.1f} s after SIGSTOP (hang_timeout_s={HANG}); resuming at step {saved}")
    out = run(torchrun([*ov, f"train.steps={saved + 1}"]))
    assert f"at step {saved}" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_of_a_killed_launcher_exit(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(torchrun(overrides(demo_shards, run_dir, **{"train.steps": 300})))
    ranks = {}
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, proc, 240)
        ranks = ranks_of(proc.pid)
        assert len(ranks) == 2
        proc.kill()  # SIGKILL torchrun alone: its ranks live in their own sessions
        proc.wait()
        gone, alive = psutil.wait_procs(list(ranks.values()), timeout=20)
        assert not alive, "orphaned ranks kept running"
    finally:
        kill_all(ranks.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_when_a_save_fits_and_the_relaunch_resumes(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    ov = overrides(demo_shards, run_dir, **{"train.steps": 300})
    proc = launch(torchrun(ov))
    ranks = {}
    try:
        wait_for(lambda: 2 in complete_steps(run_dir) and logged_steps(run_dir) >= 3, proc, 300)
        ranks = ranks_of(proc.pid)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank, as SLURM signals every task
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_all([*ranks.values(), proc])
    assert "SIGTERM: saved step" in out, out[-4000:]
    assert_intact(run_dir)
    saved = complete_steps(run_dir)[-1]
    assert saved >= 3 and f"saved step {saved}" in out
    meta = json.loads((run_dir / "checkpoints" / f"step_{saved:08d}" / "complete.json").read_text())
    assert {f["rank"] for f in meta["files"].values()} == {0, 1}  # both ranks' files, gathered by rank 0
    out = run(torchrun([*ov, f"train.steps={saved + 1}"]))
    assert f"at step {saved}" in out


@pytest.fixture(scope="module")
def two_checkpoints(demo_shards, tmp_path_factory) -> Path:
    """One rank, 4 steps: complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    run(single(overrides(demo_shards, run_dir)))
    assert complete_steps(run_dir) == [2, 4]
    assert_intact(run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(two_checkpoints, demo_shards, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    tag = run_dir / "checkpoints" / "step_00000004"
    victim = sorted(tag.glob("*optim_states.pt"))[0] if damage == "flip" else tag / "mp_rank_00_model_states.pt"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    out = run(single(overrides(demo_shards, run_dir, **{"train.steps": 2})))
    warning = next(line for line in out.splitlines() if "is damaged" in line)
    assert str(victim) in warning and ("missing" if damage == "delete" else "altered") in warning
    assert "step_00000002 at step 2" in out
    assert not (tag / "complete.json").exists() and (tag / "complete.json.damaged").exists()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MB tmpfs (skipped where mount is not permitted), unmounted after the test."""
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "16m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(fs: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on `fs`."""
    ballast = fs / "ballast"
    free = shutil.disk_usage(fs).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def _one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
    return errors[0]


@pytest.mark.slow
def test_save_into_a_full_disk_stops_with_one_line_and_keeps_older_checkpoints(two_checkpoints, demo_shards,
                                                                               small_fs):
    run_dir = small_fs / "run"
    shutil.copytree(two_checkpoints, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    ballast = _fill(small_fs, 300_000)  # a checkpoint is about 1.1 MB
    ov = overrides(demo_shards, run_dir, **{"train.steps": 4})
    line = _one_error_line(run(single(ov), expect_rc=2))
    assert "step_00000004 cannot be saved" in line and str(run_dir / "checkpoints") in line
    assert "free space there" in line and "MB" in line and "resumes from step_00000002" in line
    assert complete_steps(run_dir) == [2]
    assert_intact(run_dir)
    ballast.unlink()
    out = run(single(ov))
    assert "step_00000002 at step 2" in out and complete_steps(run_dir) == [2, 4]


def _file_size_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_a_save_whose_write_fails_leaves_no_complete_marker(demo_shards, tmp_path):
    """No earlier save to size the next one by: the write itself fails (file size limit), mid-checkpoint."""
    run_dir = tmp_path / "run"
    ov = overrides(demo_shards, run_dir, **{"train.steps": 2})
    line = _one_error_line(run(single(ov), expect_rc=2, preexec_fn=_file_size_limit(500_000)))
    assert "step_00000002 cannot be saved" in line and "rank 0" in line, line
    assert complete_steps(run_dir) == []
    assert not (run_dir / "checkpoints" / "step_00000002" / "complete.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_data_prep_into_a_full_disk_then_rerun_is_byte_identical(demo_shards, small_fs):
    images = demo_shards.parent / "images-train"  # what conftest sharded into demo_shards
    out_dir = small_fs / "shards"
    ballast = _fill(small_fs, 250_000)  # the split is 5 shards of about 135 KB
    cmd = [sys.executable, "-m", "data_prep", "shard", str(images), str(out_dir), "--split", "train",
           "--shard-size", "32", "--seed", "0", "--workers", "1"]
    line = _one_error_line(run(cmd, expect_rc=2))
    assert f"OUT {out_dir} is full" in line and "MB more are needed" in line and "re-run" in line, line
    ballast.unlink()
    run(cmd)
    written = sorted(p.name for p in out_dir.glob("train-*.tar"))
    assert written == sorted(p.name for p in demo_shards.glob("train-*.tar"))
    for name in written:
        assert (out_dir / name).read_bytes() == (demo_shards / name).read_bytes(), name
    assert "up to date" in run(cmd)
