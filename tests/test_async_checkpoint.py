"""checkpoint.async_save with real processes: 2 CPU ranks through the deepspeed launcher, ZeRO-2, coatnet-nano.

A kill right after an asynchronous save was marked complete resumes from it; a kill while one is being written
(rank 0's writer held after its first file: pipeline.checkpoint.async_save's fault hook) leaves that tag unmarked, and
the relaunch resumes from the previous one. Both continue with the losses and weights of an uninterrupted run.
"""
from __future__ import annotations

import json
import subprocess
import time

import psutil
import pytest
import torch

from tests.test_faults import assert_intact, complete_steps
from tests.test_pipeline_train import REPO, _env, base_overrides, deepspeed_cmd, metrics

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

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


def test_the_copy_a_save_writes_does_not_change_with_training():
    from collections import OrderedDict

    from pipeline.checkpoint.async_save import host_copy

    weight = torch.arange(6, dtype=torch.float32)
    state = {"module": OrderedDict(w=weight, tied=weight), "step": 3, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    copy = host_copy(state)
    weight.add_(1.0)  # the next optimizer step, in place
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copy["module"]["w"], torch.arange(6, dtype=torch.float32))
    assert copy["module"]["tied"] is copy["module"]["w"]  # tied weights stay one tensor in the file
    assert type(copy["module"]) is OrderedDict and copy["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_a_failed_background_write_is_reported_and_never_marked(tmp_path):
    import errno
    import os

    from pipeline.checkpoint.async_save import AsyncSaver, Pending

    tag = tmp_path / "step_00000004"
    tag.mkdir()

    def full_disk():
        (tag / "model.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    saver = AsyncSaver(rank=0, world_size=1)
    pending = Pending(4, str(tag), time.monotonic(), writes=[(str(tag / "model.pt"), full_disk)])
    saver._write(pending, keep=3, meta={})
    assert pending.error.startswith("rank 0: [Errno 28]") and pending.write_failure
    assert not (tag / "complete.json").exists() and (tag / ".done_rank0.json").exists()
    ok = tmp_path / "step_00000006"
    ok.mkdir()
    pending = Pending(6, str(ok), time.monotonic(), writes=[(str(ok / "a.pt"), lambda: (ok / "a.pt").write_bytes(b"x"))])
    saver._write(pending, keep=3, meta={"world_size": 1})
    marker = json.loads((ok / "complete.json").read_text())
    assert pending.error is None and marker["files"]["a.pt"]["bytes"] == 1 and marker["async"] is True
    assert not any(name.startswith(".done") for name in os.listdir(ok))  # tidied after the marker
    assert not tag.exists()  # the older unmarked tag is pruned once a newer one is complete



def test_a_marking_that_fails_is_reported_not_lost_with_the_thread(tmp_path, monkeypatch):
    """Rank 0's marking can fail after every file is written (here: a key others can read, refused when signing);
    the writer reports it as the save's error instead of dying with it, and the checkpoint stays unmarked."""
    import os

    from pipeline.checkpoint.async_save import AsyncSaver, Pending

    key = tmp_path / "checkpoint.key"
    key.write_text("ab" * 32 + "\n")
    os.chmod(key, 0o644)
    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(key))
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    pending = Pending(2, str(tag), time.monotonic(), writes=[(str(tag / "a.pt"), lambda: (tag / "a.pt").write_bytes(b"x"))])
    AsyncSaver(rank=0, world_size=1)._write(pending, keep=3, meta={})
    assert pending.error.startswith("rank 0:") and "chmod 600" in pending.error and pending.seconds is not None
    assert not (tag / "complete.json").exists()


def test_a_save_of_a_step_a_killed_save_left_unmarked_starts_from_an_empty_folder(tmp_path):
    """A killed async save leaves `.done_rank<r>.json` files behind; saving that step again after the resume must
    not find them, or rank 0 would mark the checkpoint before that rank's new files are written."""
    from pipeline.checkpoint.layout import clear_unmarked

    stale, marked = tmp_path / "step_00000004", tmp_path / "step_00000002"
    for tag in (stale, marked):
        tag.mkdir()
        (tag / ".done_rank1.json").write_text(json.dumps({"files": {}}))
    (marked / "complete.json").write_text(json.dumps({"step": 2}))
    clear_unmarked(str(stale))
    clear_unmarked(str(marked))
    assert not stale.exists() and (marked / ".done_rank1.json").exists()


@pytest.mark.slow
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
