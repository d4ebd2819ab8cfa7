"""Bad steps and config changes on resume: 2 real CPU ranks (deepspeed launcher), ZeRO-2, bf16, coatnet-nano.

NaN losses are injected with pipeline.faults.step_guard's fault hook (env COATNET_FAULT_NAN_STEPS: rank 0's first
micro-batch loss at those steps), so the other rank only learns of them through the guard's all-reduce.
"""
import json
import math
import shutil
import subprocess

import pytest
import torch

from tests.test_pipeline_train import REPO, _env, base_overrides, consolidate, deepspeed_cmd, metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]


def launch(overrides: dict, run_dir, shards, nan_steps: str = "", expect_rc: int = 0) -> str:
    extra = {"data.val": None, "train.steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep": 20, **overrides}
    env = {**_env(), "COATNET_FAULT_NAN_STEPS": nan_steps}
    res = subprocess.run(deepspeed_cmd(base_overrides(shards, run_dir, **extra)), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode == expect_rc, out[-6000:]
    return out


def client(run_dir, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def weights(run_dir, step: int) -> dict:
    return consolidate(run_dir / "checkpoints", f"step_{step:08d}", zero_stage=2)


def ema(run_dir, step: int) -> dict:
    """The EMA a checkpoint holds: every rank's fragment file (pipeline.train.ema), or an older format's full copy in
    the client state."""
    from safetensors.torch import load_file

    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    files = sorted(tag.glob("ema_rank*.safetensors"))
    if not files:
        return client(run_dir, step)["ema"]
    return {f"{path.name}/{key}": value for path in files for key, value in load_file(path).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def nan_run(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fault") / "run"
    out = launch({"train.ema_decay": 0.5}, run_dir, demo_shards, nan_steps="5,6")
    return run_dir, out


def test_non_finite_steps_are_skipped_and_leave_weights_untouched(nan_run):
    run_dir, out = nan_run
    assert "step 5 not applied: non-finite loss" in out and "step 6 not applied" in out
    train, _ = metrics(run_dir)
    assert sorted(train) == list(range(1, 9))
    assert math.isnan(train[5]["loss"]) and math.isnan(train[6]["loss"]) and math.isfinite(train[7]["loss"])
    assert [train[s]["bad_steps"] for s in (4, 5, 6, 8)] == [0, 1, 2, 2]
    assert train[7]["lr"] < train[4]["lr"]  # the schedule still counted the skipped steps
    # Steps 5 and 6 changed nothing: fp32 master weights, BatchNorm statistics, EMA and its count.
    assert same(weights(run_dir, 4), weights(run_dir, 6)) and not same(weights(run_dir, 6), weights(run_dir, 8))
    c4, c6 = client(run_dir, 4), client(run_dir, 6)
    assert same(c4["module"], c6["module"]) and same(ema(run_dir, 4), ema(run_dir, 6))
    assert c4["ema_updates"] == c6["ema_updates"] == 4 and client(run_dir, 8)["ema_updates"] == 6
    assert c6["step_guard"] == {"bad_steps": 2, "skip_steps": []}


def test_bad_steps_in_a_row_roll_back_and_skip_their_batches(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = launch({"train.steps": 10, "checkpoint.every_steps": 4, "train.max_bad_steps": 2}, run_dir, demo_shards,
                 nan_steps="6,7")
    assert "rolled back to step 4" in out and "steps 6,7 (32 samples) will be skipped" in out, out[-4000:]
    assert "step 6: skipped its batches (16 samples)" in out and "step 7: skipped its batches" in out
    train, _ = metrics(run_dir)
    assert sorted(train) == list(range(1, 11))  # the rolled-back records were dropped, the replay logged once
    assert all(math.isfinite(train[s]["loss"]) for s in (5, 8, 9, 10))
    assert train[10]["bad_steps"] == 2 and train[10]["samples_seen"] == 160
    final = client(run_dir, 10)
    assert final["step_guard"] == {"bad_steps": 2, "skip_steps": []}
    assert all(s["batches"] == 10 * 2 for s in final["data_state"].values())  # skipped batches were consumed
    assert not same(weights(run_dir, 4), weights(run_dir, 8))


def test_relaunch_with_new_lr_reports_the_change_and_trains_at_it(nan_run, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(nan_run[0], run_dir)
    out = launch({"train.ema_decay": 0.5, "train.steps": 10, "optim.lr": 0, "optim.min_lr": 0}, run_dir, demo_shards)
    assert "config change on resume: optim.lr 0.001 -> 0 (the new value applies from the resumed step 8)" in out
    assert "config change on resume: train.steps 8 -> 10" in out
    train, _ = metrics(run_dir)
    assert train[9]["lr"] == 0 and train[10]["lr"] == 0
    before, after = weights(run_dir, 8), weights(run_dir, 10)
    params = [k for k in before if "running_" not in k and "num_batches" not in k]  # BatchNorm statistics move
    assert all(torch.equal(before[k], after[k]) for k in params)  # lr 0: AdamW moves nothing, weight decay included
    marker = json.loads((run_dir / "checkpoints" / "step_00000010" / "complete.json").read_text())
    assert marker["config"]["optim"]["lr"] == 0

    out = launch({"train.ema_decay": 0.5, "train.steps": 12, "data.image_size": 64}, run_dir, demo_shards,
                 expect_rc=2)
    assert "error: data.image_size changed from 32 to 64" in out and "new run_dir" in out
