"""optim.layer_decay: per-block LR scales (timm's param_groups_layer_decay) inside DeepSpeed's real optimizer."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model import create_model, param_groups
from pipeline.config import ConfigError, load_config
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def test_layer_ids_follow_timm_head_one_stem_smallest():
    net = create_model("coatnet-nano", num_classes=3, image_size=32)
    n = net.config.num_blocks
    groups = param_groups(net, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["norm.weight"])] == 1.0
    assert {scale[id(p)] for k, p in named.items() if k.startswith("stem.")} == {0.5 ** (n + 1)}
    first = next(p for k, p in named.items() if k.startswith("stages.0.blocks.0."))
    last_stage = len(net.stages) - 1
    last = next(p for k, p in named.items()
                if k.startswith(f"stages.{last_stage}.blocks.{len(net.stages[-1].blocks) - 1}."))
    assert scale[id(first)] == 0.5 ** n and scale[id(last)] == 0.5
    assert groups[0]["lr_scale"] == 1.0  # head first: param_groups[0] carries the base LR the trainer logs
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert all(g["weight_decay"] in (0.0, 0.05) for g in groups)
    plain = param_groups(net, 0.05)  # off: the two plain groups, no scale
    assert len(plain) == 2 and "lr_scale" not in plain[0]


def test_layer_decay_out_of_range_is_one_line():
    with pytest.raises(ConfigError, match="optim.layer_decay must be in"):
        load_config(None, ["optim.layer_decay=1.5"])


WORKER = textwrap.dedent("""
    import json, os, sys
    from types import SimpleNamespace
    import deepspeed, torch
    import torch.nn.functional as F
    from model import create_model
    from pipeline.config import load_config
    from pipeline.train.build import build_engine

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config(None, ["optim.layer_decay=0.5", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2",
                             "precision=bf16", "deepspeed.zero_stage=2", "train.global_batch_size=4",
                             "train.micro_batch_size=4", "model.name=coatnet-nano"])
    torch.manual_seed(0)
    net = create_model("coatnet-nano", num_classes=3, image_size=32).to(torch.bfloat16)
    info = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    engine = build_engine(cfg, SimpleNamespace(total_steps=10, steps_per_epoch=10), info, net, universal=False)
    schedule = engine.lr_scheduler.schedule
    out = {"num_blocks": net.config.num_blocks, "schedule": [schedule.lr_at(s) for s in range(10)], "lrs": []}
    for step in range(3):
        out["lrs"].append([g["lr"] for g in engine.optimizer.param_groups])
        x, y = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16), torch.randint(0, 3, (4,))
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()
    engine.lr_scheduler.restart_at(7)  # what a resume does
    out["restarted"] = [g["lr"] for g in engine.optimizer.param_groups]
    out["weight_decays"] = [g["weight_decay"] for g in engine.optimizer.param_groups]
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.slow
def test_deepspeed_optimizer_groups_get_the_decayed_learning_rates(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, "-c", WORKER, str(out)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    n, schedule = r["num_blocks"], r["schedule"]
    expected_scales = [g["lr_scale"] for g in param_groups(create_model("coatnet-nano", num_classes=3,
                                                                        image_size=32), 0.05, 0.5)]
    assert sorted(set(expected_scales)) == sorted(0.5 ** k for k in range(n + 2))  # head 1 .. stem 0.5^(n+1)
    for step, lrs in enumerate(r["lrs"]):
        assert lrs == pytest.approx([s * schedule[step] for s in expected_scales], rel=1e-9), step
    assert r["restarted"] == pytest.approx([s * schedule[7] for s in expected_scales], rel=1e-9)
    assert set(r["weight_decays"]) == {0.0, 0.05}
