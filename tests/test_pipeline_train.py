"""Pretraining end to end: real launchers (deepspeed, torchrun), 2 CPU ranks, bf16, ZeRO 1/2/3, on data_prep shards.

One ZeRO-2 run under the deepspeed launcher is the reference: loss, TensorBoard, metrics, consolidation, and
the uninterrupted losses that the kill-and-resume run must reproduce exactly. Its step-8 checkpoint is then
resumed on ONE rank (universal checkpoint). ZeRO-1 runs under torchrun with a truncated shard (bf16 with fp32
gradient accumulation: DeepSpeed's BF16_Optimizer, whose checkpoints zero_to_fp32 refuses) and is resumed on
one rank too; ZeRO-3 with EMA and in-training evaluation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# torchvision 0.29 announces its decoders' move to TorchCodec on every decode; the pipeline still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 24
# An EMA that follows the weights almost exactly: the ZeRO-2 run checks the sharded EMA's arithmetic against
# DeepSpeed's own consolidation of the fp32 master weights.
TINY_EMA = {"train.ema_decay": 1e-6}


def base_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir), "data.train": str(shards), "data.val": str(shards), "data.image_size": 32,
        "data.num_workers": 1, "data.shuffle_buffer": 64, "data.randaugment_layers": 0,
        "data.randaugment_magnitude": 5, "model.name": "coatnet-nano", "train.global_batch_size": 16,
        "train.micro_batch_size": 4, "train.steps": STEPS, "train.log_every": 1, "optim.lr": 1e-3,
        "optim.warmup_steps": 2, "optim.min_lr": 1e-4, "checkpoint.every_steps": 8, "checkpoint.keep": 3,
        "deepspeed.zero_stage": 2, "precision": "bf16",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def deepspeed_cmd(overrides, module="pipeline.pretrain", ranks=2):
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), "--module", module, *overrides]


def torchrun_cmd(overrides, module="pipeline.pretrain"):
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), "-m", module, *overrides]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-6000:]}"
    return res


def metrics(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    train, evals = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train[rec["step"]] = rec
        else:
            evals.append(rec)
    return train, evals


def consolidate(ckpt: Path, tag: str, zero_stage: int) -> dict:
    """The fp32 master weights of a checkpoint: DeepSpeed's zero_to_fp32 for ZeRO 2/3; for ZeRO-1 + bf16 (the
    BF16_Optimizer, which zero_to_fp32 refuses) the pipeline's own reader, checked against the module's copies."""
    if zero_stage != 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    from pipeline.weights.zero_checkpoint import read_tag

    assert list((ckpt / tag).glob("bf16_zero_pp_rank_*_optim_states.pt"))
    state, meta = read_tag(str(ckpt / tag), ema=False)
    assert meta["zero_stage"] == 1 and not meta["ema"]
    module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for key, low in module.items():  # every fp32 master rounds to exactly the bf16 copy DeepSpeed trained with
        if low.dtype == torch.bfloat16:
            assert torch.equal(state[key].to(low.dtype), low), key
    return state


def check_run(run_dir: Path, steps: int = STEPS, zero_stage: int = 2) -> dict[int, dict]:
    """Loss falls; metrics and TensorBoard agree; the last checkpoint consolidates into the model strictly."""
    train, _ = metrics(run_dir)
    assert sorted(train) == list(range(1, steps + 1))
    losses = [train[s]["loss"] for s in range(1, steps + 1)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "perf/images_per_s",
                "train/samples_seen", "train/epoch", "mem/rss_gb"):
        assert tag in tags, (tag, tags)
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(tb_loss) == list(range(1, steps + 1))
    assert all(abs(tb_loss[s] - train[s]["loss"]) < 1e-5 for s in tb_loss)

    from model import create_model

    ckpt = run_dir / "checkpoints"
    tag = f"step_{steps:08d}"
    assert (ckpt / tag / "complete.json").exists() and (ckpt / "zero_to_fp32.py").exists()
    state = consolidate(ckpt, tag, zero_stage)
    cfg = json.loads((run_dir / "classes.json").read_text())
    model = create_model("coatnet-nano", num_classes=len(cfg["classes"]), image_size=32)
    model.load_state_dict(state, strict=True)
    return train


def assert_ema_follows_weights(run_dir: Path) -> None:
    """With TINY_EMA the EMA is the weights: each rank averaged only its fragment of every fp32 master weight and
    wrote it beside DeepSpeed's shards; assembled, they are the fp32 master weights the pipeline's reader
    consolidates."""
    from pipeline.weights.pretrained import load_weights
    from pipeline.weights.files import ema_fragment_files

    files = ema_fragment_files(str(run_dir / "checkpoints" / f"step_{STEPS:08d}"))
    assert [f["rank"] for f in files] == [0, 1] and all(f["updates"] == STEPS for f in files)
    ema, ema_meta = load_weights(str(run_dir), ema=True)
    trained, trained_meta = load_weights(str(run_dir), ema=False)
    assert ema_meta["ema"] and not trained_meta["ema"] and ema.keys() == trained.keys()
    for key, value in trained.items():
        if "running_" in key:  # BatchNorm statistics: averaged over ranks, and kept in bf16 by DeepSpeed
            assert torch.allclose(ema[key], value, atol=1e-3, rtol=1e-2), key
        elif value.is_floating_point():
            assert torch.allclose(ema[key], value, atol=1e-5, rtol=1e-4), key


@pytest.fixture(scope="module")
def zero2_run(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    res = run(deepspeed_cmd(base_overrides(demo_shards, run_dir, **TINY_EMA)))
    return run_dir, res


@pytest.fixture(scope="module")
def reference(zero2_run) -> dict[int, dict]:
    """The uninterrupted ZeRO-2 run's logged steps: what a resumed run must repeat."""
    return metrics(zero2_run[0])[0]


@pytest.mark.slow
def test_zero2_deepspeed_launcher(zero2_run):
    run_dir, res = zero2_run
    train = check_run(run_dir)
    assert train[STEPS]["samples_seen"] == STEPS * 16
    assert train[1]["lr"] == pytest.approx(1e-3 / 2) and train[2]["lr"] == pytest.approx(1e-3)
    assert train[STEPS]["lr"] == pytest.approx(1e-4)  # cosine reaches min_lr on the last step
    _, evals = metrics(run_dir)
    assert evals and evals[-1]["eval/count"] == 32  # the whole val split, each image once over 2 ranks
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008", "step_00000016", "step_00000024"]
    client = torch.load(run_dir / "checkpoints" / "step_00000024" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert client["step"] == STEPS and client["samples_seen"] == STEPS * 16
    assert set(client["rng"]) == {"0", "1"} and set(client["data_state"]) == {"0", "1"}
    assert (run_dir / "config.yaml").exists()
    assert_ema_follows_weights(run_dir)


@pytest.mark.slow
def test_kill_and_resume_gives_identical_losses(reference, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = deepspeed_cmd(base_overrides(demo_shards, run_dir, **TINY_EMA))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill right after the step-8 checkpoint is complete
            if (run_dir / "checkpoints" / "step_00000008" / "complete.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, mid-run
        proc.wait()
    assert (run_dir / "checkpoints" / "step_00000008" / "complete.json").exists()
    assert not (run_dir / "checkpoints" / f"step_{STEPS:08d}").exists(), "the run finished before the kill"
    # As if the kill had hit the next save half-way: DeepSpeed's `latest` names a tag with a broken file.
    half = run_dir / "checkpoints" / "step_00000016"
    half.mkdir(exist_ok=True)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)
    (run_dir / "checkpoints" / "latest").write_text("step_00000016")
    res = run(cmd)
    assert "resumed from" in res.stdout + res.stderr and "step_00000008 at step 8" in res.stdout + res.stderr
    resumed, _ = metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-6, (step, resumed[step], reference[step])
        assert resumed[step]["lr"] == reference[step]["lr"]


@pytest.mark.slow
def test_two_ranks_resume_on_one_rank_through_universal_checkpoint(zero2_run, reference, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run[0], run_dir)
    for tag in ("step_00000016", "step_00000024"):
        shutil.rmtree(run_dir / "checkpoints" / tag)  # the newest left is step 8, written by 2 ranks
    res = run([sys.executable, "-m", "pipeline.pretrain", *base_overrides(demo_shards, run_dir, **{"data.val": None})])
    out = res.stdout + res.stderr
    assert "universal" in out and "at step 8" in out
    assert (run_dir / "checkpoints" / "universal" / "step_00000008" / "zero").is_dir()
    resumed, _ = metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):  # the schedule and the sample count continue
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9)
        assert resumed[step]["samples_seen"] == step * 16
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete.json").read_text())
    assert meta["world_size"] == 1


@pytest.fixture(scope="module")
def zero1_run(demo_shards, tmp_path_factory):
    """ZeRO-1 under torchrun on shards with one truncated shard; returns (run_dir, result, shards)."""
    shards = tmp_path_factory.mktemp("zero1") / "shards"
    shutil.copytree(demo_shards, shards)
    victim = shards / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    run_dir = shards.parent / "run"
    overrides = {"deepspeed.zero_stage": 1, "data.val": None, **TINY_EMA}
    return run_dir, run(torchrun_cmd(base_overrides(shards, run_dir, **overrides))), shards


@pytest.mark.slow
def test_zero1_torchrun_with_truncated_shard(zero1_run):
    run_dir, res, _ = zero1_run
    assert "skipped corrupt data" in res.stderr + res.stdout and "train-000002.tar" in res.stderr + res.stdout
    train = check_run(run_dir, zero_stage=1)
    assert train[STEPS]["data/corrupt_skipped"] >= 1
    assert_ema_follows_weights(run_dir)


@pytest.mark.slow
def test_zero1_bf16_two_ranks_resume_on_one_rank_through_universal_checkpoint(zero1_run, tmp_path):
    """The BF16_Optimizer's checkpoint goes through ds_to_universal like ZeRO-2's; the conversion's weights are
    the pipeline reader's, and the run continues its schedule on one rank."""
    source, _, shards = zero1_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for tag in ("step_00000016", "step_00000024"):
        shutil.rmtree(run_dir / "checkpoints" / tag)  # the newest left is step 8, written by 2 ranks
    overrides = {"deepspeed.zero_stage": 1, "data.val": None}
    res = run([sys.executable, "-m", "pipeline.pretrain", *base_overrides(shards, run_dir, **overrides)])
    out = res.stdout + res.stderr
    assert "universal" in out and "at step 8" in out
    from pipeline.weights.pretrained import load_weights

    universal, meta = load_weights(str(run_dir / "checkpoints" / "universal" / "step_00000008"), ema=False)
    original, _ = load_weights(str(source / "checkpoints" / "step_00000008"), ema=False)
    assert meta["format"] == "universal" and universal.keys() == original.keys()
    assert all(torch.equal(universal[k], original[k]) for k in original)
    reference, resumed = metrics(source)[0], metrics(run_dir)[0]
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9)
        assert resumed[step]["samples_seen"] == step * 16
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete.json").read_text())
    assert meta["world_size"] == 1
    from model import create_model

    state = consolidate(run_dir / "checkpoints", f"step_{STEPS:08d}", zero_stage=1)  # one rank's BF16_Optimizer
    create_model("coatnet-nano", num_classes=4, image_size=32).load_state_dict(state, strict=True)


@pytest.mark.slow
def test_save_request_checkpoints_and_stops_then_the_same_command_resumes(demo_shards, tmp_path):
    """A preemption notice (launch/slurm/pretrain.sbatch touches run_dir/.save_now on SIGUSR1) makes the trainer
    save a complete checkpoint at the next step and exit 0; relaunching continues from that step."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.pretrain",
           *base_overrides(demo_shards, run_dir, **{"data.val": None, "train.steps": 500,
                                                    "checkpoint.every_steps": 1000})]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            logged = metrics(run_dir)[0] if (run_dir / "metrics.jsonl").exists() else {}
            if len(logged) >= 3:
                break
            time.sleep(0.2)
        (run_dir / ".save_now").touch()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    saved = [int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/complete.json")]
    assert len(saved) == 1 and 3 <= saved[0] < 500, out[-3000:]
    assert f"saved step {saved[0]} on request" in out and not (run_dir / ".save_now").exists()
    assert max(metrics(run_dir)[0]) == saved[0]  # stopped right there

    res = run([*cmd, f"train.steps={saved[0] + 2}"])  # the later override wins
    assert f"at step {saved[0]}" in res.stdout + res.stderr
    assert sorted(metrics(run_dir)[0]) == list(range(1, saved[0] + 3))


def test_train_state_round_trip_and_world_size_change():
    """The client state has exactly CLIENT_KEYS; the same world continues RNG and positions, a new one regroups."""
    import random

    from pipeline.runtime.distributed import DistInfo
    from pipeline.data.loader import loader_state_for_rank
    from pipeline.train.state import CLIENT_KEYS, TrainState

    class Loader:
        def state_dict(self):
            return {"layout": {"rank": 0}, "batches": 6, "positions": {"0": {"pass": 1, "offset": 5, "corrupt": 2}}}

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    state = TrainState(0, info, global_batch=16, steps_per_epoch=4, run_meta={"world_size": 1, "mode": "pretrain"})
    state.attach_loader(Loader())
    for _ in range(6):
        state.advance()
    random.seed(3)
    client = state.state_dict()
    assert tuple(client) == CLIENT_KEYS and client["samples_seen"] == 96 and client["epoch"] == 1.5
    expected = random.random()
    restored = TrainState(0, info, global_batch=16, steps_per_epoch=4)
    restored.load_state_dict(client)
    assert restored.step == 6 and restored.data_state == {"0": Loader().state_dict()} and random.random() == expected

    two = {"0": Loader().state_dict(), "1": {"layout": {"rank": 1}, "positions": {"0": {"pass": 2, "offset": 1,
                                                                                      "corrupt": 1}}}}
    assert loader_state_for_rank(two, 1, 2) == two["1"]
    merged = loader_state_for_rank(two, 1, 3)  # a new world: every stream's position, corrupt counts on rank 0 only
    assert merged["layout"] is None and set(merged["positions"]) == {"0.0", "1.0"}
    assert all(p["corrupt"] == 0 for p in merged["positions"].values())
    assert sum(p["corrupt"] for p in loader_state_for_rank(two, 0, 1)["positions"].values()) == 3
