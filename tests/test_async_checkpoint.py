"""checkpoint.async_save with real processes: 2 CPU ranks through the deepspeed launcher, ZeRO-2, coatnet-nano.

A kill right after an asynchronous save was marked complete resumes from it; a kill while one is being written
(rank 0's writer held after its first file: pipeline.checkpoint.async_save's fault hook) leaves that tag unmarked, and
the relaunch resumes from the previous one. Both continue with the losses and weights of an uninterrupted run.
"""
from __future__ import annotations

import subprocess
import time

import psutil
import pytest
import torch

from tests.test_faults import assert_intact, complete_steps
from tests.test_pipeline_train import REPO, _env, base_overrides, deepspeed_cmd, metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]

STEPS = 6


def command(shards, run_dir):
    return deepspeed_cmd(base_overrides(shards, run_dir, **{
        "data.val": None, "train.steps": STEPS, "checkpoint.every_steps": 2, "checkpoint.keep": 5,
        "checkpoint.async_save": "true", "train.ema_decay": 0.5, "precision": "fp32", "train.hang_timeout_s": 120}))


def launch(shards, run_dir, fault: str = "", expect_rc: int = 0) -> str:
    res = subprocess.run(command(shards, run_dir), cwd=REPO, env={**_env(), "COATNET_FAULT_ASYNC_SAVE": fault},
                         capture_output=True, text=True, timeout=400)
    out = res.stdout + res.stderr
    assert (res.returncode == 0) == (expect_rc == 0), f"rc {res.returncode}\n{out[-6000:]}"
    return out


def losses(run_dir) -> dict[int, float]:
    return {step: rec["loss"] for step, rec in metrics(run_dir)[0].items()}


def module_weights(run_dir, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    launch(demo_shards, run_dir)
    assert complete_steps(run_dir) == [2, 4, 6]
    assert_intact(run_dir)
    return run_dir


def test_kills_right_after_and_during_an_async_save_resume_bit_identically(uninterrupted, demo_shards, tmp_path):
    reference = losses(uninterrupted)
    run_dir = tmp_path / "run"
    # 1. rank 0 is SIGKILLed right after it marked step 2 complete: the launcher ends the job
    launch(demo_shards, run_dir, fault="kill:2", expect_rc=1)
    assert complete_steps(run_dir) == [2]
    # 2. the relaunch resumes from step 2; rank 0's writer is held inside step 4's save, and the job is killed then
    proc = subprocess.Popen(command(demo_shards, run_dir), cwd=REPO, env={**_env(), "COATNET_FAULT_ASYNC_SAVE": "stall:4"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tag = run_dir / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 300
    try:
        while not (tag.is_dir() and any(tag.glob("*.pt")) and (tag / ".done_rank1.json").exists()):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "step 4's save never started"
            time.sleep(0.2)
    finally:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        out = proc.communicate()[0]
    assert "resumed from" in out and "at step 2" in out, out[-4000:]
    assert not (tag / "complete.json").exists() and complete_steps(run_dir) == [2]  # written in part, never marked
    assert {s: losses(run_dir)[s] for s in (3, 4)} == {s: reference[s] for s in (3, 4)}
    # 3. the relaunch resumes from step 2 again, not from the unmarked step 4, and ends as the uninterrupted run
    out = launch(demo_shards, run_dir)
    assert "at step 2" in out, out[-4000:]
    assert losses(run_dir) == reference
    assert complete_steps(run_dir) == [2, 4, 6]
    assert_intact(run_dir)
    mine, theirs = module_weights(run_dir, STEPS), module_weights(uninterrupted, STEPS)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
