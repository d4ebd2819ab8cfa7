"""Memory: the model is built from the meta device with weights that depend on the seed only, and the memory
benchmark's smoke setting runs (its real figures are in docs/benchmarks.md, "Memory per rank", not asserted here)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.runtime import distributed as D
from pipeline.train.build import build_model
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(**extra):
    values = {"model.name": "coatnet-tiny", "data.image_size": 32, "precision": "bf16", "seed": 3, **extra}
    return load_config(REPO / "configs/demo/pretrain.yaml", [f"{k}={v}" for k, v in values.items()])


def _info(rank, world):
    return D.DistInfo(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                      device=torch.device("cpu"), backend="gloo")


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_initial_weights_depend_on_the_seed_only_not_on_rank_or_world_size():
    plan = SimpleNamespace(num_classes=5, classes=None, shards=None)
    torch.manual_seed(123)  # the global RNG's state must not matter
    one = build_model(_cfg(), plan, _info(0, 1), from_pretrained=True).state_dict()
    torch.rand(1000)
    two = build_model(_cfg(), plan, _info(1, 2), from_pretrained=True).state_dict()
    other = build_model(_cfg(seed=4), plan, _info(0, 1), from_pretrained=True).state_dict()
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    weight = "stages.2.blocks.0.attn.qkv.weight"
    assert one[weight].dtype == torch.bfloat16 and one["stem.norm1.running_var"].dtype == torch.float32
    assert not torch.equal(one[weight], other[weight])
    # the distributions model.coatnet._init_weights documents: Linear/table std 0.02, conv He fan-out, biases 0
    assert 0.015 < one[weight].float().std() < 0.025 and not one["stages.2.blocks.0.attn.qkv.bias"].any()
    conv = one["stem.conv1.weight"].float()
    assert 0.7 < conv.std() / (2.0 / (9 * conv.shape[0])) ** 0.5 < 1.3


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak-RSS reset needed")
def test_build_model_never_holds_an_fp32_copy():
    """coatnet-1 in bf16 is 84 MB (fp32: 168 MB): built from the meta device the peak rise is the 16-bit model
    plus one fp32 tensor, not the fp32 model that create_model on the CPU makes first (the old build)."""
    plan = SimpleNamespace(num_classes=10, classes=None, shards=None)
    build_model(_cfg(), plan, _info(0, 1), from_pretrained=True)  # imports and first-use allocations
    cfg = _cfg(**{"model.name": "coatnet-1"})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    model = build_model(cfg, plan, _info(0, 1), from_pretrained=True)
    rise = (_status_kib("VmHWM") - before) * 1024
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert rise < 0.75 * fp32, f"peak rose {rise / 2**20:.0f} MiB for a {fp32 / 2**20:.0f} MiB fp32 model"


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/memory_scale.py", "--models", "coatnet-nano", "--stages",
                          "pretrain", "--image-size", "32", "--work", str(tmp_path), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert {(r["phase"], r["rank"]) for r in rows} == {(p, r) for p in ("build", "step", "eval", "save")
                                                        for r in (0, 1)}
    for r in rows:  # a real process: Python + torch + DeepSpeed are resident, and the baseline is itself
        assert r["peak_mib"] > 200 and r["above_baseline_mib"] == 0 and r["planned_above_mib"] == 0


# benchmarks/memory_scale.py --offload --models coatnet-0 --image-size 32 --ranks R (bf16, ZeRO-2, micro-batch 2,
# 4 classes; this machine, 2 shared CPU cores; docs/NOTES-off21.md): per rank, the bytes of the tensors DeepSpeed's
# ZeRO-2 optimizer keeps in host memory with offload_optimizer after two steps (fp32 master + its .grad, the 16-bit
# partition buffer, the CPU staging buffer, CPU Adam's moments, a few bytes of bookkeeping).
COATNET0_32PX = {"params": 24_176_656, "largest_param": 2_359_296}
MEASURED_OFFLOAD_HELD = {2: 222_311_956, 4: 113_517_004}


@pytest.mark.parametrize("ranks", [2, 4])
def test_planner_offload_model_is_within_20_percent_of_the_measurement(ranks):
    """launch.offload's per-rank model (18 B x P / N + 2 B x largest parameter, no pinned rounding on a CPU) against
    the benchmark's figures above; the per-node figure the planner prints is GPUs per node times it."""
    from launch.offload import zero2_offload_rank

    measured = MEASURED_OFFLOAD_HELD[ranks]
    model = zero2_offload_rank(COATNET0_32PX["params"], COATNET0_32PX["largest_param"], ranks, pinned=False)
    assert abs(model.total / measured - 1) < 0.2
    # from first principles: the optimizer's share is 16 B x P / N (+ 2 for the 16-bit copy), not 4 B x P x N
    assert model.total == pytest.approx(18 * COATNET0_32PX["params"] / ranks + 2 * COATNET0_32PX["largest_param"],
                                        rel=1e-6)
    pinned = zero2_offload_rank(COATNET0_32PX["params"], COATNET0_32PX["largest_param"], ranks, pinned=True)
    assert model.total < pinned.total < model.total + 10 * COATNET0_32PX["params"] / ranks + model.staging


@pytest.mark.slow
def test_offload_measurement_at_two_ranks_matches_the_planner(tmp_path):
    """The real measurement: 2 CPU ranks (torchrun, DeepSpeed CPU Adam), coatnet-0 at 32 px, two steps (~90 s)."""
    res = subprocess.run([sys.executable, "benchmarks/memory_scale.py", "--offload", "--models", "coatnet-0",
                          "--image-size", "32", "--ranks", "2", "--work", str(tmp_path), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["setting"]["offload_optimizer"] and len(out["rows"]) == 2
    for r in out["rows"]:
        assert r["params"] == COATNET0_32PX["params"] and r["largest_param"] == COATNET0_32PX["largest_param"]
        held = r["optimizer_held"]
        # the moments exist (the step ran on the CPU Adam) and are the 8 B x P / N the model counts
        assert held["optimizer.state"] == pytest.approx(8 * r["params"] / 2, rel=1e-3)
        assert 0.8 < r["planned_vs_measured"] < 1.2 and r["offload_held_bytes"] > 0
